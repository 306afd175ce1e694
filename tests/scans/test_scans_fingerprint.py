"""Content fingerprints: the bytes of every image and annotations.json, memoised by path, size and times."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import cv2
import pytest
from helpers import make_dataset

import scans.fingerprint as fingerprint
from scans.fingerprint import dataset_fingerprint, memo_home


def _dataset(root: Path) -> list[str]:
    scans = make_dataset(root, n_patients=3, per_patient=2, size=32)
    return [s.path.relative_to(root).as_posix() for s in scans]


def _forget_in_process() -> None:
    with fingerprint._MEMO_LOCK:
        fingerprint._MEMO.clear()


def test_inverted_copy_with_same_annotations_differs(tmp_path: Path) -> None:
    files = _dataset(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in files:
        path = tmp_path / "b" / name
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image is not None
        cv2.imwrite(str(path), 255 - image)
    assert (tmp_path / "a" / "annotations.json").read_bytes() == (tmp_path / "b" / "annotations.json").read_bytes()
    memo = tmp_path / "memo"
    assert dataset_fingerprint(tmp_path / "a", files, memo_dir=memo) != dataset_fingerprint(
        tmp_path / "b", files, memo_dir=memo
    )


def test_copy_keeps_it_and_order_and_repeats_do_not_matter(tmp_path: Path) -> None:
    files = _dataset(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    memo = tmp_path / "memo"
    fp = dataset_fingerprint(tmp_path / "a", files, memo_dir=memo)
    assert dataset_fingerprint(tmp_path / "moved", files, memo_dir=memo) == fp  # a moved dataset keeps its caches
    absolute = [tmp_path / "a" / f for f in reversed(files)] + [tmp_path / "a" / files[0]]
    assert dataset_fingerprint(tmp_path / "a", absolute, memo_dir=memo) == fp
    assert dataset_fingerprint(tmp_path / "a", files[1:], memo_dir=memo) != fp  # which images: part of it


def test_touch_keeps_it_one_byte_changes_it(tmp_path: Path) -> None:
    root = tmp_path / "d"
    files = _dataset(root)
    memo = tmp_path / "memo"
    fp = dataset_fingerprint(root, files, memo_dir=memo)
    target = root / files[3]
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    _forget_in_process()
    assert dataset_fingerprint(root, files, memo_dir=memo) == fp

    data = bytearray(target.read_bytes())
    data[-20] ^= 0x01  # one byte, same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime restored
    assert dataset_fingerprint(root, files, memo_dir=memo) != fp

    (root / "annotations.json").write_text((root / "annotations.json").read_text() + " ")
    changed = dataset_fingerprint(root, files, memo_dir=memo)
    assert changed != fp


def test_warm_call_reads_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "d"
    files = _dataset(root)
    memo = tmp_path / "memo"
    fp = dataset_fingerprint(root, files, memo_dir=memo)
    saved = json.loads(next(memo.glob("*.json")).read_text())
    assert len(saved["files"]) == len(files) + 1  # the images and annotations.json

    _forget_in_process()  # a new process: only the on-disk memo remains

    def no_read(path: str) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(fingerprint, "_hash_file", no_read)
    assert dataset_fingerprint(root, files, memo_dir=memo) == fp
    with pytest.raises(AssertionError, match="hashed again"):
        dataset_fingerprint(root, files, memo_dir=memo, use_memo=False)


def test_memo_survives_corruption_and_concurrent_writers(tmp_path: Path) -> None:
    root = tmp_path / "d"
    files = _dataset(root)
    memo = tmp_path / "memo"
    fp = dataset_fingerprint(root, files, use_memo=False)
    memo.mkdir()
    first = dataset_fingerprint(root, files[:1], memo_dir=memo)
    memo_file = next(memo.glob("*.json"))
    memo_file.write_text('{"version": 1, "files": ')  # torn by something else
    _forget_in_process()
    assert dataset_fingerprint(root, files[:1], memo_dir=memo) == first

    errors: list[BaseException] = []

    def work(part: list[str]) -> None:
        try:
            dataset_fingerprint(root, part, memo_dir=memo)
        except BaseException as exc:  # reported below
            errors.append(exc)

    _forget_in_process()
    threads = [threading.Thread(target=work, args=([f],)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    saved = json.loads(memo_file.read_text())["files"]
    assert {os.path.realpath(root / f) for f in files} <= set(saved)  # every writer's entries were kept
    assert dataset_fingerprint(root, files, memo_dir=memo) == fp


def test_missing_file_named_and_default_memo_under_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "d"
    files = _dataset(root)
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))
    assert memo_home() == tmp_path / "cache" / "fingerprints"
    dataset_fingerprint(root, files)
    assert len(list(memo_home().glob("*.json"))) == 1
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        dataset_fingerprint(root, [*files, "images/nothere.png"])
