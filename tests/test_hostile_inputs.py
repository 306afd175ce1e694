"""Hostile inputs, round two: each refused with a message naming the file, key or value (no traceback,
before anything trains or writes), or handled correctly.

``train`` locks its bundle folder; a tampered ``bundle.json`` is refused on load; config values of the
right type that mean nothing are refused; a bundle that cannot work is written with warnings; ``scans
check`` finds an image file listed twice; multi-page TIFFs are read page by page and JPEGs turned by
their EXIF orientation; an unusable ``LORIS_CACHE`` is named at start-up; ``scans phantom`` checks its
options; ``run`` records how it and each reused model computed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.__main__ import main
from pipeline.config import ConfigError, load_config
from tests.helpers import make_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


def _no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train`` and ``run`` fail the test, at once, if they get as far as loading data."""
    from pipeline import bundle, run

    def no_data(cfg: Any) -> Any:
        raise AssertionError("data loaded: the command was not refused before it started")

    monkeypatch.setattr(bundle, "load_data", no_data)
    monkeypatch.setattr(run, "load_data", no_data)


# ----------------------------------------------------------------------------- 1. train locks --out


def test_a_second_train_into_a_locked_bundle_folder_refuses_and_leaves_it_alone(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model"
    (out / "work" / "detector").mkdir(parents=True)
    (out / "work" / "detector" / "log.txt").write_text("the first train's work")
    holder = subprocess.Popen(  # the first `train`, holding the folder's lock as it trains
        [
            sys.executable,
            "-c",
            "import os, time; from filelock import FileLock\n"  # the lock run_lock takes, PID inside
            f"lock = FileLock({str(out / '.lock')!r}); lock.acquire(timeout=0)\n"
            f"open({str(out / '.lock')!r}, 'w').write(f'{{os.getpid()}}\\n')\n"
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )

    _no_data(monkeypatch)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = _files(out)
        code = main(["train", "--detector", "yolov5", "--out", str(out), "--profile", "quick", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and f"in use by another LoRIS process (PID {holder.pid})" in err, err
        assert "Traceback" not in err and _files(out) == before  # nothing deleted, nothing added
        assert (out / "work" / "detector" / "log.txt").read_text() == "the first train's work"
    finally:
        holder.kill()
        holder.wait()
    assert not (cache / "models").exists() and not (cache / "phantom").exists()


def test_train_refuses_a_run_folder_and_a_file(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_data(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "file").write_text("precious")
    for out, says in ((run, "is a LoRIS run folder"), (tmp_path / "file", "is an existing file")):
        assert main(["train", "--detector", "yolov5", "--out", str(out), "--profile", "quick"]) == 2
        assert says in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "precious" and _files(run) == {"config.yaml"}


# ----------------------------------------------------------------------------- 2. tampered bundle.json


def _bundle_json(root: Path, **changes: Any) -> Path:
    """A bundle folder holding only a valid ``bundle.json`` (then ``changes``, dotted keys)."""
    from detectors.prior import PriorPolicy
    from pipeline.bundle import Thresholds, bundle_doc

    cfg = load_config(None, "quick", ["image_size=64"])
    doc = bundle_doc(cfg, PriorPolicy(0.05, (8.0, 16.0, 56.0, 32.0)), Thresholds(0.2, {}, 0.1, 0.5))
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = doc
        for p in parents:
            node = node[p]
        node[last] = value
    root.mkdir(parents=True)
    (root / "bundle.json").write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them
    return root


TAMPERED: dict[str, tuple[dict[str, Any], str]] = {
    "score threshold NaN": ({"score.threshold": math.nan}, "score.threshold is nan"),
    "score threshold inf": ({"score.threshold": math.inf}, "score.threshold is inf"),
    "segmentation threshold NaN": ({"segmentation.threshold": math.nan}, "segmentation.threshold is nan"),
    "image_size -5": ({"image_size": -5}, "image_size is -5"),
    "image_size 100000": ({"image_size": 100000}, "image_size is 100000"),
    "unknown map": ({"maps": ["bogusmap", "dd"], "score.map": "bogusmap"}, "maps is 'bogusmap'"),
    "score map not computed": ({"score.map": "ssim"}, "score.map is 'ssim'"),
    "bad prior box": ({"prior.median_box": [1, 2, 3]}, "prior.median_box is [1, 2, 3]"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_bundle_json_is_refused_on_load_before_predict_claims_its_out(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    changes, says = TAMPERED[case]
    model = _bundle_json(tmp_path / "model", **changes)
    scans = tmp_path / "in"
    scans.mkdir()
    cv2.imwrite(str(scans / "a.png"), np.zeros((32, 32), np.uint8))
    out = tmp_path / "out"
    code = main(["predict", "--model", str(model), "--input", str(scans), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(model / "bundle.json") in err and says in err and "Traceback" not in err, err
    assert not out.exists()


def test_an_untampered_bundle_json_passes_the_check(tmp_path: Path) -> None:
    from pipeline.bundle import check_bundle_doc

    path = _bundle_json(tmp_path / "model") / "bundle.json"
    check_bundle_doc(json.loads(path.read_text()), path)


# ----------------------------------------------------------------------------- 3. config values that mean nothing

MEANINGLESS = {
    "unet.lr=.inf": "unet.lr: expected a finite number >= 0, got inf",
    "unet.lr=.nan": "unet.lr: expected a finite number >= 0, got nan",
    "detector.expand_side=.inf": "detector.expand_side: expected a finite number",
    "unet.loss_weights=[0,0,0]": "unet.loss_weights: the MSGMS, SSIM and L2 weights must be >= 0 with a positive sum",
    "unet.loss_weights=[1,-1,1]": "unet.loss_weights",
    "maps=[]": "maps: name at least one anomaly map (known: msgmsd",
    "maps=[dd,dd]": "maps: 'dd' is listed more than once",
    "maps=[bogusmap]": "maps: unknown anomaly map 'bogusmap'; known: msgmsd",
    "bundle.score_map=bogusmap": "bundle.score_map: unknown anomaly map 'bogusmap'",
    "riad.ks=[0]": "riad.ks: grid cell sizes must be 1 or more, got 0",
    "riad.ks=[]": "riad.ks: name at least one grid cell size",
    "image_size=100000": "image_size: expected an int in [16, 2048], got 100000",
    "image_size=8": "image_size: expected an int in [16, 2048], got 8",
    "seed=99999999999999999999": "seed: expected an int in [0, 4294967295], got 99999999999999999999",
    "phantom.size=100000": "phantom.size: expected an int in [32, 2048]",
    "phantom.patients=3": "phantom.patients: expected an int in [6, phantom.images",
    "unet.epoch=5": "--set unet.epoch=5: unknown key 'unet.epoch'; did you mean 'unet.epochs'?",
}


@pytest.mark.parametrize("override", list(MEANINGLESS))
def test_config_values_that_mean_nothing_are_refused_naming_the_key(override: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, "quick", [override])
    assert MEANINGLESS[override] in str(exc.value)


def test_a_meaningless_config_is_refused_before_anything_is_written(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_data(monkeypatch)
    out = tmp_path / "run"
    assert main(["run", "--profile", "quick", "--out", str(out), "--set", "maps=[]", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "maps: name at least one anomaly map" in err and "Traceback" not in err
    assert not out.exists() and not (cache / "models").exists() and not (cache / "phantom").exists()


def test_more_threads_than_cores_is_warned_not_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert load_config(None, "quick", ["threads=999"]).threads == 999
    assert "warning: threads=999 is more than this machine's 2 CPU core(s)" in capsys.readouterr().err
    load_config(None, "quick", ["threads=2"])
    assert "warning" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- 4. a bundle that cannot work


@pytest.mark.parametrize("good", [False, True], ids=["unfit", "fit"])
def test_an_unfit_bundle_is_written_with_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], good: bool
) -> None:
    import reconstruction.checkpoint
    from detectors.prior import PriorPolicy
    from pipeline import bundle

    validation = {"i_auroc": 0.9 if good else 0.119, "sensitivity": 0.8 if good else 0.0, "specificity": 1.0}
    monkeypatch.setattr(bundle, "fold_policy", lambda *a: PriorPolicy(0.05, (8.0, 16.0, 56.0, 32.0)))
    monkeypatch.setattr(bundle, "_thresholds", lambda *a: bundle.Thresholds(0.3, validation, 0.1, 0.2))
    monkeypatch.setattr(reconstruction.checkpoint, "save_model", lambda net, d, meta=None: Path(d).mkdir())

    class Saved:
        def save(self, directory: Path) -> None:
            directory.mkdir()

    cfg = load_config(None, "quick", ["image_size=64"])
    split = (np.arange(8), np.arange(8, 12))
    data = SimpleNamespace(arrays=SimpleNamespace(subset=lambda idx: None))
    bundle._write_bundle(cfg, tmp_path, data, split, (Saved(), {}), (None, {}))  # type: ignore[arg-type]
    doc = json.loads((tmp_path / "bundle.json").read_text())
    err = capsys.readouterr().err
    if good:
        assert doc["warnings"] == [] and "WARNING" not in err
    else:
        assert len(doc["warnings"]) == 2 and "I-AUROC 0.119" in doc["warnings"][0]
        assert "sensitivity 0.00" in doc["warnings"][1]
        assert "WARNING: the bundle written to" in err and "unfit for use" in err


# ----------------------------------------------------------------------------- 5. one file listed twice


def test_scans_check_reports_a_file_listed_twice_under_two_patients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scans.__main__ import main as scans_main
    from scans.check import check_dataset

    make_dataset(tmp_path, n_patients=6, per_patient=2, size=32)
    doc = json.loads((tmp_path / "annotations.json").read_text())
    first = next(i for i in doc["images"] if i["distended"])
    twin = {**first, "id": 999, "patient_id": "someone-else", "distended": False}
    doc["images"].append(twin)
    ann = next(a for a in doc["annotations"] if a["image_id"] == first["id"])
    doc["annotations"].append({**ann, "id": 999, "image_id": 999})
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    reasons = [p.reason for p in check_dataset(tmp_path)]
    twice = [r for r in reasons if "listed 2 times" in r]
    assert len(twice) == 1, reasons
    assert "under 2 patients" in twice[0] and "labelled both distended and normal" in twice[0]
    assert scans_main(["check", str(tmp_path)]) == 1
    assert first["file_name"] in capsys.readouterr().err


def test_a_file_listed_twice_through_a_symlink_is_one_file(tmp_path: Path) -> None:
    from scans.check import check_dataset

    make_dataset(tmp_path, n_patients=6, per_patient=2, size=32)
    doc = json.loads((tmp_path / "annotations.json").read_text())
    first = doc["images"][0]
    (tmp_path / "images" / "alias.png").symlink_to(tmp_path / first["file_name"])
    doc["images"].append({**first, "id": 999, "file_name": "images/alias.png"})
    ann = next(a for a in doc["annotations"] if a["image_id"] == first["id"])
    doc["annotations"].append({**ann, "id": 999, "image_id": 999})
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    assert any("listed 2 times" in p.reason for p in check_dataset(tmp_path))


# ----------------------------------------------------------------------------- 6. multi-page TIFF


def _pages(path: Path, n: int = 3, dtype: Any = np.uint8) -> list[np.ndarray]:
    scale = 255 if dtype == np.uint8 else 65535
    pages = [np.full((24, 32), (i + 1) * scale // (n + 1), dtype) for i in range(n)]
    for i, p in enumerate(pages):
        p[2 + i, 3] = 0  # each page differs in its pixels, not only its level
    assert cv2.imwritemulti(str(path), pages)
    return pages


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["8bit", "16bit"])
def test_every_page_of_a_multi_page_tiff_is_a_frame(tmp_path: Path, dtype: Any) -> None:
    from scans.readers import ReadError, count_frames, frame_indices, read_image, read_scan

    path = tmp_path / "cine.tif"
    pages = _pages(path, 3, dtype)
    scale = float(np.iinfo(dtype).max)
    assert count_frames(path) == 3 and frame_indices(path, "all") == [0, 1, 2] and frame_indices(path, 2) == [2]
    for i, page in enumerate(pages):
        rr = read_scan(path, frame=i)
        assert rr.frame == i and rr.frame_count == 3
        np.testing.assert_allclose(rr.image, page / scale, atol=1e-6)
        np.testing.assert_allclose(read_image(path, frame=i), page / scale, atol=1e-6)
    for bad in (lambda: read_scan(path, frame=3), lambda: read_image(path, frame=3), lambda: frame_indices(path, 3)):
        with pytest.raises(ReadError, match="frame 3 requested but the file has 3 frame"):
            bad()


def test_predict_gives_one_row_per_tiff_page(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``predict --frames all`` and ``--frames 2`` on a 3-page TIFF (a tiny untrained bundle stands in)."""
    import csv

    import torch

    from detectors.base import Detections, Detector
    from pipeline import predict
    from pipeline.bundle import Bundle
    from reconstruction.unet import UNet, UNetConfig

    model = _bundle_json(tmp_path / "model", image_size=32, **{"prior.median_box": [4.0, 8.0, 28.0, 16.0]})
    doc = json.loads((model / "bundle.json").read_text())
    torch.manual_seed(0)

    class OneBox(Detector):
        name = "one-box-test"

        def fit(self, train: Any, val: Any, workdir: Path) -> dict[str, Any]:
            return {}

        def predict(self, images: np.ndarray) -> list[Detections]:
            return [Detections(np.array([[6, 8, 26, 16]], np.float32), np.array([0.9], np.float32)) for _ in images]

        def save(self, directory: Path) -> None:
            raise NotImplementedError

        @classmethod
        def load(cls, directory: Path) -> Detector:
            raise NotImplementedError

    tiny = Bundle(doc, OneBox(), UNet(UNetConfig.profile("tiny")).eval(), "cpu")
    monkeypatch.setattr(predict, "_load_bundle", lambda *a: tiny)
    scans = tmp_path / "in"
    scans.mkdir()
    _pages(scans / "cine.tif", 3)
    cv2.imwrite(str(scans / "still.png"), np.full((24, 32), 99, np.uint8))
    rows = {}
    for frames in ("all", "2"):
        out = tmp_path / f"out-{frames}"
        args = ["predict", "--model", str(model), "--input", str(scans), "--out", str(out), "--frames", frames]
        assert main([*args, "--no-progress", "--no-review", "--workers", "0"]) == 0
        with open(out / "predictions.csv", newline="") as fh:
            rows[frames] = sorted((r["file"], r["frame"]) for r in csv.DictReader(fh))
    assert rows["all"] == [("cine.tif", "0"), ("cine.tif", "1"), ("cine.tif", "2"), ("still.png", "0")]
    assert rows["2"] == [("cine.tif", "2")]


# ----------------------------------------------------------------------------- 7. EXIF orientation


def _exif_jpeg(path: Path, image: np.ndarray, orientation: int, order: str = "big") -> None:
    """``image`` as a JPEG whose EXIF (big- or little-endian) says ``orientation``."""

    def b(v: int, n: int) -> bytes:
        return v.to_bytes(n, order)  # type: ignore[arg-type]

    tiff = (b"MM" if order == "big" else b"II") + b(42, 2) + b(8, 4) + b(1, 2)
    tiff += b(0x0112, 2) + b(3, 2) + b(1, 4) + b(orientation, 2) + b"\0\0" + b(0, 4)
    payload = b"Exif\0\0" + tiff
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    data = jpeg.tobytes()
    path.write_bytes(data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:])


@pytest.mark.parametrize("order", ["big", "little"])
def test_jpeg_exif_orientation_is_applied_and_recorded(tmp_path: Path, order: str) -> None:
    from scans.readers import read_image, read_scan

    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (3, 5)), np.ones((8, 8))).astype(np.uint8)  # 24x40, no symmetry
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.jpg"
        _exif_jpeg(path, image, orientation, order)
        decoded = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)  # OpenCV applies EXIF here
        assert decoded is not None
        shown = decoded.astype(np.float32) / 255
        rr = read_scan(path)
        assert rr.orientation == orientation and rr.image.shape == shown.shape
        assert rr.original_size == (shown.shape[1], shown.shape[0])
        np.testing.assert_allclose(rr.image, shown, atol=1e-6)
        np.testing.assert_allclose(read_image(path), shown, atol=1e-6)


# ----------------------------------------------------------------------------- 8. an unusable LORIS_CACHE


def test_a_loris_cache_that_is_a_file_is_named_at_start_up(tmp_path: Path) -> None:
    """In a fresh process: torch would otherwise fail on import, creating its inductor cache in it."""
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "LORIS_CACHE": str(blocker)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "pipeline", "train", "--out", str(tmp_path / "m")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"LoRIS cache {blocker}" in done.stderr and "LORIS_CACHE" in done.stderr
    assert not (tmp_path / "m").exists() and blocker.read_text() == "not a folder"


def test_a_loris_cache_that_cannot_be_written_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_data(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [blocker / "below-a-file"]
    if os.geteuid() != 0:  # root writes into any folder
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append(locked)
    for where in cases:
        monkeypatch.setenv("LORIS_CACHE", str(where))
        assert main(["run", "--profile", "quick", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert f"LoRIS cache {where} (from $LORIS_CACHE) is not a writable folder" in err, err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 9. scans phantom options

PHANTOM_BAD = {
    "--images 0": "n_images (--images) must be 6 or more",
    "--patients 0": "n_patients (--patients) must be in [6, 483]",
    "--images 12 --patients 6 --distended 13": "n_distended (--distended) must be in [0, 12]",
    "--size 7": "size (--size) must be in [32, 2048] pixels, got 7",
    "--size 100000": "size (--size) must be in [32, 2048] pixels, got 100000",
    "--seed -1": "seed (--seed) must be in [0, 4294967295]",
}


@pytest.mark.parametrize("options", list(PHANTOM_BAD))
def test_scans_phantom_refuses_bad_options_before_rendering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], options: str
) -> None:
    import scans.phantom
    from scans.__main__ import main as scans_main

    def no_render(*a: Any, **k: Any) -> Any:
        raise AssertionError("rendered a phantom with options it should have refused")

    monkeypatch.setattr(scans.phantom, "render_scan", no_render)
    out = tmp_path / "ph"
    assert scans_main(["phantom", "--out", str(out), *options.split()]) == 2
    err = capsys.readouterr().err
    assert PHANTOM_BAD[options] in err and "Traceback" not in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 10. provenance


def test_the_cache_records_how_a_model_was_trained_and_reports_it_on_reuse(tmp_path: Path) -> None:
    import torch

    from pipeline.cache import cached_info, fit_or_load, publish

    entry = tmp_path / "unet-single-1"

    def save(p: Path) -> None:
        p.mkdir()
        (p / "model.txt").write_text("m")

    def fit() -> tuple[str, dict[str, Any]]:
        publish(entry, save, {"fit_s": 1.0})
        return "m", {"fit_s": 1.0}

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model, info = fit_or_load(entry, lambda p: (p / "model.txt").read_text(), fit)
        torch.set_num_threads(2)
        again, reused = fit_or_load(entry, lambda p: (p / "model.txt").read_text(), fit)
    finally:
        torch.set_num_threads(before)
    trained = {"world_size": 1, "distributed_backend": None, "torch_threads": 1}
    assert info["cached"] is False and info["trained_with"] == trained
    assert reused["cached"] is True and reused["trained_with"] == trained  # not this process's 2 threads
    assert cached_info(entry) == {"fit_s": 1.0, "trained_with": trained}


def test_summary_json_records_world_size_backend_threads_and_reused_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from evaluation.results import FoldResult
    from pipeline import provenance, run
    from pipeline.fold import FoldOutput
    from pipeline.outputs import write_json

    trained = {"world_size": 2, "distributed_backend": "gloo", "torch_threads": 4}
    info = {
        "unet": {"cached": True, "cache": "c/unet-single-x", "trained_with": trained},
        "detector_yolov5": {"cached": False, "cache": "c/det", "refiner": {"cached": True, "cache": "c/ref"}},
    }
    fo = FoldOutput(FoldResult(fold=0), info=info)
    monkeypatch.setattr(run, "plan", lambda *a, **k: None)
    monkeypatch.setattr(run, "run_folds", lambda p: ([fo], 0))
    monkeypatch.setattr(run, "aggregate", lambda p, outputs: {})
    summary_json = tmp_path / "out" / "summary.json"
    monkeypatch.setattr(run, "report", lambda p, outputs, summary: write_json(summary_json, summary))
    cfg = load_config(None, "quick", ["threads=1"])
    threads = torch.get_num_threads()
    try:
        run.execute(cfg, tmp_path / "out", ["gt"])
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["runtime"] == {"world_size": 1, "distributed_backend": None, "torch_threads": 1}
    assert summary["reused_models"] == [
        {"fold": 0, "model": "unet", "cache": "c/unet-single-x", "trained_with": trained},
        {"fold": 0, "model": "detector_yolov5/refiner", "cache": "c/ref", "trained_with": None},
    ]
    machine = provenance.machine()
    assert {"world_size", "distributed_backend", "torch_threads"} <= set(machine)


def test_cache_home_check_passes_a_usable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scans.runtime import check_cache_home

    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "new" / "cache"))
    assert check_cache_home() == tmp_path / "new" / "cache" and _files(tmp_path / "new") == {"cache"}
    shutil.rmtree(tmp_path / "new")
