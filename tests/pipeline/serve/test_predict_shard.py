"""Archive-scale ``predict`` (issue 19): DataLoader workers, ``--shard K/N`` and ``merge``, masks as RLE in
``predictions.csv`` and opt-in overlays (in-process, offline)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.__main__ import main  # the environment (OMP_WAIT_POLICY) is set by tests/conftest.py
from pipeline.serve.merge import merge_outputs
from pipeline.serve.predict import decode_mask, parse_shard, predict_folder, shard_of
from pipeline.serve.predict.writer import _to_original
from tests.helpers import train_quick_bundle

N_SHARDS = 3
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle trained once (quick profile, tiny phantom) and a folder of 9 scans, a corrupt PNG,
    an empty DICOM and a text file."""
    bundle, cache = train_quick_bundle(tmp_path_factory)
    folder = bundle.parent / "in"
    (folder / "sub").mkdir(parents=True)
    for i, png in enumerate(sorted((cache / "phantom").rglob("*.png"))[:9]):
        where = folder / "sub" if i % 4 == 0 else folder
        cv2.imwrite(str(where / f"scan{i}.png"), cv2.imread(str(png), cv2.IMREAD_GRAYSCALE))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "notes.txt").write_text("not a scan")
    return bundle, folder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _run(trained: tuple[Path, Path], out: Path, **kwargs: Any) -> dict[str, Any]:
    model, folder = trained
    kwargs = {"recursive": True, "batch_size": 1, "progress": False, "review": False, "workers": 0, **kwargs}
    return predict_folder(model, folder, out, **kwargs)


def _table(out: Path) -> list[tuple[tuple[str, str], ...]]:
    """Prediction and error rows of a folder, order-insensitive."""
    return sorted(tuple(sorted(r.items())) for name in ("predictions.csv", "errors.csv") for r in _rows(out / name))


def test_parse_shard_refuses_bad_specs() -> None:
    assert parse_shard("2/3") == (2, 3) and parse_shard(" 0/1 ") == (0, 1)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0", ""):
        with pytest.raises(ValueError):
            parse_shard(bad)
    assert [shard_of("sub/a.png", 4)] * 2 == [shard_of("sub/a.png", 4), shard_of("sub/a.png", 4)]


def test_shards_partition_the_folder_and_merge_equals_one_run(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = tmp_path / "whole"
    _run(trained, whole, overlays=True)
    shards = [tmp_path / f"shard{k}" for k in range(N_SHARDS)]
    for k, out in enumerate(shards):
        _run(trained, out, overlays=True, shard=f"{k}/{N_SHARDS}")
    # every file (scans and errors) is in exactly one shard, the one its path hash names
    owners: dict[str, int] = {}
    for k, out in enumerate(shards):
        for r in _rows(out / "predictions.csv") + _rows(out / "errors.csv"):
            assert owners.setdefault(r["file"], k) == k == shard_of(r["file"], N_SHARDS)
    assert sorted(owners) == sorted({r["file"] for r in _rows(whole / "predictions.csv") + _rows(whole / "errors.csv")})
    assert len({*owners.values()}) == N_SHARDS  # 12 files fall in every shard

    merged = tmp_path / "merged"
    assert main(["merge", *map(str, shards), "--out", str(merged)]) == 0
    said = capsys.readouterr().out
    assert f"shards 0,1,2 of {N_SHARDS}" in said and "missing" not in said
    assert _table(merged) == _table(whole)
    rows = _rows(merged / "predictions.csv")
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows)
    for r in rows:  # the overlays came along
        np.testing.assert_array_equal(cv2.imread(str(merged / r["overlay"])), cv2.imread(str(whole / r["overlay"])))
    assert json.loads((merged / "predict.json").read_text())["shard"] == {"n": N_SHARDS, "k": [0, 1, 2]}
    page = said.strip().splitlines()[-1].removeprefix("review page: ")
    assert Path(page).parent == merged and "scan1.png" in Path(page).read_text()

    # a partial merge names the missing shard; merging into a folder with results is refused
    assert merge_outputs(shards[:2], tmp_path / "part", review=False)["missing_shards"] == [2]
    with pytest.raises(ValueError, match="already holds"):
        merge_outputs(shards, merged)


def test_merge_refuses_another_bundle_and_overlapping_shards(trained: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _run(trained, a, shard="0/2")
    _run(trained, b, shard="1/2")
    # the same shard twice, and an unsharded folder beside a shard
    twin = tmp_path / "twin"
    shutil.copytree(a, twin)
    with pytest.raises(ValueError, match=r"both hold shard 0/2"):
        merge_outputs([a, twin], tmp_path / "m1")
    whole = tmp_path / "whole"
    _run(trained, whole)
    with pytest.raises(ValueError, match=r"two splits"):
        merge_outputs([whole, b], tmp_path / "m2")
    # a folder made with another bundle (its predict.json names other files)
    other = tmp_path / "other"
    shutil.copytree(b, other)
    doc = json.loads((other / "predict.json").read_text())
    doc["bundle"]["digest"] = "0" * 64
    (other / "predict.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"{other} was made with .*merge only the folders of one bundle"):
        merge_outputs([a, other], tmp_path / "m3")
    assert not (tmp_path / "m3").exists()
    # the command line says which, in one line
    assert main(["merge", str(a), str(twin), "--out", str(tmp_path / "m4")]) == 2
    # resuming a folder with another shard (or bundle) is refused before anything is written
    with pytest.raises(ValueError, match="holds shard 0/2, not 1/2"):
        _run(trained, a, shard="1/2")
    with pytest.raises(ValueError, match="not of this bundle"):
        _run(trained, other, shard="1/2")


def test_masks_are_rle_of_the_computed_mask_and_overlays_are_opt_in(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed: dict[str, np.ndarray] = {}

    def spy(rr: Any, item: Any, *args: Any) -> Any:
        mapped = _to_original(rr, item, *args)
        computed[item.rel] = mapped.mask
        return mapped

    monkeypatch.setattr("pipeline.serve.predict.writer._to_original", spy)
    out = tmp_path / "out"
    _run(trained, out, batch_size=4)
    rows = _rows(out / "predictions.csv")
    assert rows and set(computed) == {r["file"] for r in rows}
    for r in rows:
        mask = decode_mask(r)
        # what the mask PNG held: the computed mask, in the scan's own pixels
        assert mask.dtype == bool and mask.shape == (int(r["height"]), int(r["width"]))
        np.testing.assert_array_equal(mask, computed[r["file"]] > 0)
        assert r["overlay"] == ""
    assert not (out / "overlays").exists() and not (out / "masks").exists()
    assert any(decode_mask(r).any() for r in rows)  # not all empty: the round trip is tested on real masks


def test_workers_give_the_rows_of_the_main_process_and_list_unreadable_files(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    serial, parallel = tmp_path / "w0", tmp_path / "w2"
    _run(trained, serial, batch_size=3, workers=0)
    stats = _run(trained, parallel, batch_size=3, workers=2, prefetch=1)
    assert _rows(parallel / "predictions.csv") == _rows(serial / "predictions.csv")  # same rows, same order
    errors = {e["file"]: e["reason"] for e in _rows(parallel / "errors.csv")}
    assert errors == {e["file"]: e["reason"] for e in _rows(serial / "errors.csv")}
    assert set(errors) == {"corrupt.png", "empty.dcm", "notes.txt"} and "unsupported" in errors["notes.txt"]
    assert stats["processed"] == 9 and stats["errors"] == 3
    # resume under workers: a lost last row is redone, nothing else
    lines = (parallel / "predictions.csv").read_text().splitlines(True)
    (parallel / "predictions.csv").write_text("".join(lines[:-1]))
    again = _run(trained, parallel, batch_size=3, workers=2)
    assert again["processed"] == 1 and again["errors"] == 0 and again["skipped_already_done"] == 8 + 3
    assert _table(parallel) == _table(serial)
