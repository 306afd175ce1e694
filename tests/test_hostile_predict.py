"""``predict``, ``merge`` and ``export`` against a hostile user ("Hardening, round two"): two processes on
one ``--out``, file names that are not UTF-8 or that a spreadsheet would run as formulas, a killed run's
decoding workers, resumes with other settings or damaged outputs, and Ray's network calls (offline)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from filelock import FileLock
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.__main__ import main  # first: it sets OMP_WAIT_POLICY before torch loads
from pipeline.predict import FORMULA_START, PRED_FIELDS, csv_name, decode_mask, decode_name, safe_cell
from scans.coco import encode_mask
from tests.helpers import train_quick_bundle

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A bundle trained once for the module (quick profile, tiny phantom) and one phantom scan."""
    bundle, cache = train_quick_bundle(tmp_path_factory)
    png = sorted((cache / "phantom").rglob("*.png"))[0]
    scan = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    assert scan is not None
    return bundle, scan


@pytest.fixture
def model(trained: tuple[Path, np.ndarray]) -> Path:
    return trained[0]


@pytest.fixture
def scan(trained: tuple[Path, np.ndarray]) -> np.ndarray:
    return trained[1]


def _scans(folder: Path, scan: np.ndarray, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"s{i}.png"), np.roll(scan, 3 * i, axis=1))
    return folder


def _predict(model: Path, folder: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--model", str(model), "--input", str(folder), "--out", str(out), "--no-progress", *extra])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (and its bytes), the lock file left out."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files.pop(".lock", None)
    return files | {"(dirs)": "\n".join(sorted(p.name for p in folder.rglob("*") if p.is_dir())).encode()}


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- 1. one process at a time on an output folder -------------------------------------------------------


def test_a_second_process_on_one_out_is_refused_and_writes_nothing(
    model: Path, scan: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _scans(tmp_path / "in", scan)
    out = tmp_path / "out"
    assert _predict(model, folder, out) == 0
    cv2.imwrite(str(folder / "new.png"), scan)  # more work for the second call, were it let in
    before = _snapshot(out)
    holder = FileLock(str(out / ".lock"))  # what a running predict holds (flock: other processes see it too)
    holder.acquire(timeout=0)
    try:
        assert _predict(model, folder, out) == 2
        line = _one_line_error(capsys)
        assert str(out) in line and "in use by another LoRIS process" in line
        assert _snapshot(out) == before
        # merge into it, and export into it, are refused the same way
        assert main(["merge", str(out), "--out", str(out.parent / "merged")]) == 2  # the shard is being written
        assert "being written by a running predict" in _one_line_error(capsys)
        assert not (tmp_path / "merged").exists()
        assert main(["export", "--model", str(model), "--out", str(out), "--no-detector"]) == 2
        assert "in use by another LoRIS process" in _one_line_error(capsys)
        assert _snapshot(out) == before
    finally:
        holder.release()
    # a first run that has only just taken a new folder: the second leaves nothing in it
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    holder = FileLock(str(fresh / ".lock"))
    holder.acquire(timeout=0)
    try:
        assert _predict(model, folder, fresh) == 2
        assert "in use" in _one_line_error(capsys)
        assert sorted(p.name for p in fresh.iterdir()) == [".lock"]
    finally:
        holder.release()
    # once the lock is free the rerun resumes: only the new scan is processed
    assert _predict(model, folder, out) == 0
    assert sorted(r["file"] for r in _rows(out / "predictions.csv")) == ["new.png", "s0.png", "s1.png"]


# --- 2 and 5. names that are not UTF-8, and cells a spreadsheet would run ----------------------------------

HOSTILE = [
    b"bad\xff\xfe.png",  # not UTF-8
    b"=cmd.png",
    b"+sum.png",
    b"-minus.png",
    b"@at.png",
    b"\ttab.png",
    b"\rcr.png",
    b"'quoted.png",  # already starts with the guard's quote
    b"back\\slash.png",
    b"back\\xffnot-a-byte.png",  # the escape's own spelling, as a plain name
    b"caf\xc3\xa9.png",  # UTF-8, not ASCII: written as it is
]


def _unsafe(cell: str) -> bool:
    """A cell a spreadsheet would run as a formula (a number, such as a negative score, is data)."""
    try:
        float(cell)
    except ValueError:
        return cell.startswith(FORMULA_START)
    return False


def test_hostile_names_are_processed_escaped_and_resumed(
    model: Path, scan: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _scans(tmp_path / "in", scan, n=1)
    raw = bytes(folder)
    for name in HOSTILE:
        shutil.copyfile(raw + b"/s0.png", raw + b"/" + name)
    shutil.copyfile(raw + b"/s0.png", raw + b"/=HYPERLINK(x)\xff.txt")  # refused: unsupported type
    out = tmp_path / "out"
    assert _predict(model, folder, out, "--overlays", "--batch-size", "3") == 0
    preds, errors = _rows(out / "predictions.csv"), _rows(out / "errors.csv")
    # every scan has its row, and its name comes back, byte for byte
    assert sorted(os.fsencode(decode_name(r["file"])) for r in preds) == sorted([*HOSTILE, b"s0.png"])
    assert [os.fsencode(decode_name(e["file"])) for e in errors] == [b"=HYPERLINK(x)\xff.txt"]
    assert "unsupported" in errors[0]["reason"]
    cells = {os.fsencode(decode_name(r["file"])): r["file"] for r in preds}
    assert cells[b"bad\xff\xfe.png"] == "bad\\xff\\xfe.png" and cells[b"=cmd.png"] == "'=cmd.png"
    assert cells[b"'quoted.png"] == "''quoted.png" and cells[b"back\\slash.png"] == "back\\\\slash.png"
    assert cells[b"caf\xc3\xa9.png"] == "café.png" and len(set(cells.values())) == len(cells)
    # no cell of either CSV runs as a formula
    for row in preds + errors:
        assert not any(_unsafe(v) for v in row.values()), row
    # every row has its overlay and every overlay its row; masks decode
    overlays = {p.relative_to(out).as_posix() for p in (out / "overlays").iterdir()}
    assert overlays == {r["overlay"] for r in preds} and len(overlays) == len(preds)
    assert all(decode_mask(r).shape == scan.shape for r in preds)
    assert (out / "index.html").is_file()
    # a rerun finds everything done: no row twice
    capsys.readouterr()
    assert _predict(model, folder, out, "--overlays") == 0
    assert "0 image(s)" in capsys.readouterr().err
    assert len(_rows(out / "predictions.csv")) == len(preds) and len(_rows(out / "errors.csv")) == 1


_NAME_BYTES = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b)


@settings(max_examples=300, deadline=None)
@given(a=_NAME_BYTES, b=_NAME_BYTES)
def test_names_round_trip_and_never_share_a_cell(a: bytes, b: bytes) -> None:
    ca, cb = csv_name(os.fsdecode(a)), csv_name(os.fsdecode(b))
    assert os.fsencode(decode_name(ca)) == a
    assert (ca == cb) == (a == b)
    assert not ca.startswith(FORMULA_START)
    ca.encode("utf-8")  # always writable


def test_cells_from_scans_are_neutralised_and_masks_still_decode() -> None:
    assert safe_cell("=1.2.840") == "'=1.2.840" and safe_cell("1.2.840") == "1.2.840"  # a DICOM's UID
    assert safe_cell(os.fsdecode(b"x\xff")) == "x\\udcff"  # a reason quoting a name: still writable
    mask = np.zeros((20, 4), bool)
    mask[13:, 0] = True  # a first run of 13 background pixels: COCO RLE starts with "="
    counts = encode_mask(mask)["counts"]
    assert counts.startswith("=")
    row = {"mask_rle": safe_cell(counts), "width": "4", "height": "20"}
    assert row["mask_rle"] == "'" + counts
    np.testing.assert_array_equal(decode_mask(row), mask)


# --- 3. a killed predict leaves no decoding process -----------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_kill_9_of_predict_ends_its_decoding_workers(model: Path, scan: np.ndarray, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    big = cv2.resize(scan, (384, 384))
    for i in range(150):
        cv2.imwrite(str(folder / f"s{i:03d}.png"), np.roll(big, i, axis=1))
    out = tmp_path / "out"
    env = {**os.environ, "LORIS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["--model", str(model), "--input", str(folder), "--out", str(out), "--workers", "2", "--batch-size", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "predict", *args, "--no-progress", "--no-review"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            rows = (out / "predictions.csv").read_bytes().count(b"\n") if (out / "predictions.csv").exists() else 0
            if len(workers) >= 2 and rows >= 2:  # mid-run: workers decoding, rows written
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) >= 2, "predict ended before it could be killed mid-run"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "decoding workers outlived their killed parent"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- 4. a resume must describe what is there --------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "old", "new"),
    [
        (["--crop", "auto"], "--crop regions", "--crop auto"),
        (["--overlays"], "no --overlays", "--overlays"),
        (["--frames", "all"], "no --frames", "--frames all"),
        (["--dicom-out", "seg"], "no --dicom-out", "--dicom-out seg"),
    ],
)
def test_resume_with_other_settings_is_refused(
    model: Path,
    scan: np.ndarray,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    old: str,
    new: str,
) -> None:
    tmp = tmp_path_factory.mktemp("resume")
    folder, out = _scans(tmp / "in", scan), tmp / "out"
    assert _predict(model, folder, out) == 0
    before = _snapshot(out)
    assert _predict(model, folder, out, *extra) == 2
    line = _one_line_error(capsys)
    assert f"begun with {old} and this run has {new}" in line and str(out) in line
    assert _snapshot(out) == before and not (out / "overlays").exists()


def test_results_without_manifest_or_not_ours_are_refused(
    model: Path, scan: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, out = _scans(tmp_path / "in", scan), tmp_path / "out"
    assert _predict(model, folder, out) == 0
    # predict.json deleted: the other-bundle check cannot be bypassed
    manifest = (out / "predict.json").read_bytes()
    (out / "predict.json").unlink()
    before = _snapshot(out)
    assert _predict(model, folder, out) == 2
    line = _one_line_error(capsys)
    assert "holds predictions.csv and errors.csv but no predict.json" in line and str(out) in line
    assert _snapshot(out) == before
    (out / "predict.json").write_bytes(manifest)
    # a predictions.csv that is not text (byte 0xff in a row): named, left as it is
    pred = out / "predictions.csv"
    data = pred.read_bytes()
    cut = data.index(b"s1.png")
    pred.write_bytes(data[:cut] + b"\xff" + data[cut:])
    before = _snapshot(out)
    assert _predict(model, folder, out) == 2
    line = _one_line_error(capsys)
    assert f"{pred} is not a LoRIS predictions.csv" in line and "0xff" in line
    assert _snapshot(out) == before
    # a damaged predict.json is named too
    (out / "predict.json").write_bytes(b"\xff{")
    assert _predict(model, folder, out) == 2
    assert f"{out / 'predict.json'} is not a LoRIS predict.json" in _one_line_error(capsys)


def test_merge_refuses_shards_made_with_other_settings(
    model: Path, scan: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _scans(tmp_path / "in", scan, n=4)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _predict(model, folder, a, "--shard", "0/2", "--no-review") == 0
    assert _predict(model, folder, b, "--shard", "1/2", "--no-review", "--crop", "none") == 0
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 2
    line = _one_line_error(capsys)
    assert f"{b} was made with --crop none and {a} with --crop regions" in line
    assert not (tmp_path / "m").exists()


# --- 6. Ray stays off the network ---------------------------------------------------------------------------


class _FakeRay:
    """Stands in for the ``ray`` module: records ``init``'s arguments and the environment it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], dict[str, str]]] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs: Any) -> None:
        self.calls.append((kwargs, dict(os.environ)))


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_FakeRay]:
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    yield fake


def test_local_ray_is_started_without_dashboard_usage_stats_or_metadata_probe(
    fake_ray: _FakeRay, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pipeline.predict_ray import _start_ray

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    started, scratch = _start_ray(None, 2)
    assert started and len(fake_ray.calls) == 1
    kwargs, env = fake_ray.calls[0]
    assert kwargs["include_dashboard"] is False and env["RAY_USAGE_STATS_ENABLED"] == "0"
    # Ray's API server runs without the dashboard and probes cloud metadata unless this file exists
    ray_home = Path(env["HOME"])
    assert ray_home != tmp_path / "home" and (ray_home / "ray_bootstrap_config.yaml").read_text() == "{}\n"
    assert kwargs["runtime_env"] == {"env_vars": {"HOME": str(tmp_path / "home")}}  # the actors keep theirs
    assert os.environ["HOME"] == str(tmp_path / "home")  # and so does this process
    if scratch is not None:
        shutil.rmtree(scratch)
    _start_ray("ray://cluster:10001", 2)  # joining a cluster: this driver reports nothing either
    assert fake_ray.calls[1][1]["RAY_USAGE_STATS_ENABLED"] == "0"


def test_ray_actors_get_names_that_are_not_utf8(model: Path, scan: np.ndarray, tmp_path: Path) -> None:
    from pipeline.predict import Outputs, ReadOptions
    from pipeline.predict_ray import BundleActor

    folder = _scans(tmp_path / "in", scan, n=1)
    bad = bytes(folder) + b"/=bad\xff.png"
    shutil.copyfile(bytes(folder) + b"/s0.png", bad)
    out = tmp_path / "out"
    out.mkdir()
    actor = BundleActor(str(model), "cpu", str(folder), str(out), ReadOptions(), Outputs(), 1)
    # as the driver sends them through Arrow: bytes
    batch = {"path": np.array([bad], dtype=object), "rel": np.array([b"=bad\xff.png"], dtype=object)}
    got = actor(batch | {"frame": np.array([0])})
    (row,) = [json.loads(r) for r in got["row"]]
    assert list(got["kind"]) == ["row"] and row["file"] == "'=bad\\xff.png" and set(row) == set(PRED_FIELDS)
