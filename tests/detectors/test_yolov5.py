"""YOLOv5u (ultralytics) detector: offline fit, save/load without pickles, predictions, YOLO labels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors import DETECTORS, Detections, PriorPolicy, build_detector
from detectors.yolo_format import box_to_yolo_line, write_dataset, yolo_line_to_box
from detectors.yolov5 import YoloV5Detector
from runtime.io import CheckpointError
from scans.records import ScanArrays
from tests.network_guard import guarded_env


def _synthetic(n: int, size: int, seed: int) -> ScanArrays:
    """Speckle images with one dark, flat recess-like band and its bright floor per image."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.45, 0.08, (n, size, size)).astype(np.float32)
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        w, h = int(rng.uniform(0.35, 0.5) * size), int(rng.uniform(0.1, 0.16) * size)
        x, y = int(rng.uniform(0.1 * size, 0.9 * size - w)), int(rng.uniform(0.3 * size, 0.8 * size - h))
        images[i, y : y + h, x : x + w] -= 0.3
        images[i, y + h : y + h + 3, x : x + w] += 0.4
        boxes[i] = (x, y, x + w, y + h)
    return ScanArrays(
        images.clip(0, 1),
        boxes,
        np.zeros((n, size, size), bool),
        np.zeros(n, np.int64),
        np.arange(n) + 1000 * seed,
        [f"p{seed}_{i}" for i in range(n)],
        np.ones((n, 2), np.float32),
    )


def test_yolo_label_matches_coco_box(tmp_path: Path) -> None:
    a = _synthetic(3, 64, seed=5)
    a.boxes[2] = np.nan  # a scan without a box becomes a background image (empty label file)
    data = write_dataset(a, a.subset([0]), tmp_path)
    lines = (tmp_path / "labels" / "train" / "00005000.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("0 ")
    x1, y1, x2, y2 = (float(v) for v in a.boxes[0])
    coco = [x1, y1, x2 - x1, y2 - y1]  # the COCO [x, y, w, h] of the same box
    back = yolo_line_to_box(lines[0], 64, 64)
    np.testing.assert_allclose([back[0], back[1], back[2] - back[0], back[3] - back[1]], coco, atol=1e-3)
    assert (tmp_path / "labels" / "train" / "00005002.txt").read_text() == ""
    assert "recess" in data.read_text()
    import cv2

    png = cv2.imread(str(tmp_path / "images" / "train" / "00005000.png"), cv2.IMREAD_UNCHANGED)
    assert png is not None and png.shape == (64, 64, 3) and (png[..., 0] == png[..., 2]).all()  # grayscale x 3
    assert box_to_yolo_line((-5, 0, 32, 70), 64, 64) == "0 0.250000 0.500000 0.500000 1.000000"  # clipped


def test_registered() -> None:
    assert DETECTORS["yolov5"] is YoloV5Detector
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detector("yolov5", imgsz=100)
    with pytest.raises(ValueError, match="unknown yolov5 config keys"):
        build_detector("yolov5", epoch=3)  # a typo must not silently train with defaults


@pytest.mark.parametrize("name", ["yolov5.yaml", "yolov5_paper.yaml"])
def test_shipped_configs_load(name: str) -> None:
    path = Path(__file__).resolve().parents[2] / "configs" / "detectors" / name
    det = build_detector("yolov5", config_file=str(path), seed=7, device="cpu")
    assert det.config["seed"] == 7 and det.config["model"] in ("yolov5n.yaml", "yolov5s.yaml")  # arguments win


def test_fit_save_load_predict_offline(tmp_path: Path) -> None:
    """1 epoch on 16 images at 64 px: offline (network guard), no pickles on load, same predictions."""
    train, val = _synthetic(16, 64, seed=0), _synthetic(6, 64, seed=1)
    threads = torch.get_num_threads()
    det = build_detector("yolov5", imgsz=64, epochs=1, batch=8, mosaic=0.0, conf=0.0, predict_batch=4)
    summary = det.fit(train, val, tmp_path / "run")
    assert summary["epochs_run"] == 1 and summary["architecture"] == "YOLOv5u"
    assert torch.get_num_threads() == threads  # ultralytics' thread override is undone
    assert (tmp_path / "run" / "train" / "results.csv").is_file()  # training logs in the run folder
    from ultralytics.utils import USER_CONFIG_DIR

    assert (USER_CONFIG_DIR / "Arial.ttf").is_file()  # the local font that stops its download

    dets = det.predict(val.images)
    assert len(dets) == len(val) and all(isinstance(d, Detections) for d in dets)
    boxes = np.concatenate([d.boxes for d in dets])
    assert len(boxes) > 0  # conf=0 keeps the (untrained) ranking
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 64).all() and (boxes[:, [1, 3]] <= 64).all()
    assert all(len(d) <= 10 for d in dets)

    det.save(tmp_path / "saved")
    state = torch.load(tmp_path / "saved" / "weights.pt", weights_only=True)  # a plain state_dict
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads((tmp_path / "saved" / "detector.json").read_text())
    assert meta["config"]["imgsz"] == 64
    loaded = YoloV5Detector.load(tmp_path / "saved")
    for a, b in zip(dets, loaded.predict(val.images)):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)

    # Flip test-time augmentation pools both passes, so it is mirror-equivariant by construction.
    tta = YoloV5Detector.load(tmp_path / "saved")
    tta.config.update(tta_flip=True, fuse_iou=0.5)
    plain, mirrored = tta.predict(val.images[:3]), tta.predict(val.images[:3, :, ::-1].copy())
    for a, b in zip(plain, mirrored):
        unmirrored = [64 - b.boxes[0][2], b.boxes[0][1], 64 - b.boxes[0][0], b.boxes[0][3]]
        np.testing.assert_allclose(a.boxes[0], unmirrored, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)

    # Images larger than imgsz are resized in and the boxes scaled back to input pixels.
    big = np.kron(val.images[:2], np.ones((2, 2), np.float32))
    np.testing.assert_allclose(loaded.predict(big)[0].boxes[0], dets[0].boxes[0] * 2, atol=2.0)


def test_prior_fallback_when_nothing_detected(tmp_path: Path) -> None:
    """An untrained-looking detector with conf=1.0 finds nothing: the prior is the median box."""
    train, val = _synthetic(16, 64, seed=2), _synthetic(4, 64, seed=3)
    det = YoloV5Detector(imgsz=64, epochs=1, batch=8, mosaic=0.0, conf=1.0)
    det.fit(train, val, tmp_path)
    dets = det.predict(val.images)
    assert all(len(d) == 0 for d in dets)
    policy = PriorPolicy(threshold=0.25, median_box=PriorPolicy.median_of(train.boxes, 64, 64))
    priors = policy.select_all(dets, 64, 64)
    assert all(p.source == "fallback" for p in priors)
    med = np.median(train.boxes, axis=0)
    np.testing.assert_allclose(priors[0].box, med, atol=1e-4)


def test_inference_keys_are_config_keys_the_trainer_never_receives(tmp_path: Path) -> None:
    from detectors.yolov5 import DEFAULTS, YoloV5Detector

    det = YoloV5Detector(epochs=1)
    assert YoloV5Detector.INFERENCE_KEYS <= set(DEFAULTS)
    assert not YoloV5Detector.INFERENCE_KEYS & set(det._train_args(tmp_path / "data.yaml", tmp_path))
    det.set_inference(conf=0.2, tta_flip=True)
    assert det.config["conf"] == 0.2 and det.config["tta_flip"] is True


def test_device_lists_translate_for_ultralytics() -> None:
    from detectors.yolov5 import _ultralytics_device

    cases = {
        "cpu": "cpu",
        "cuda": "0",
        "cuda:1": "1",
        "cuda:0,1": "0,1",
        "0,1": "0,1",
        "cuda:0, cuda:2": "0,2",
        "3": "3",
    }
    assert {d: _ultralytics_device(d) for d in cases} == cases
    for bad in ("cuda:0,0", "tpu", "cuda:x", "0,,1"):
        with pytest.raises(ValueError, match="device must be"):
            _ultralytics_device(bad)
    det = YoloV5Detector(device="cuda:1,2")
    assert det._train_args(Path("data.yaml"), Path("w"))["device"] == "1,2"  # ultralytics' multi-GPU path
    assert det._torch_device == torch.device("cuda:1")  # predict runs on the first
    assert YoloV5Detector(device="cpu")._torch_device == torch.device("cpu")


def test_bad_saved_detector_names_the_file(tmp_path: Path) -> None:
    det = YoloV5Detector(imgsz=64).init_untrained()
    det.save(tmp_path / "d")
    weights = tmp_path / "d" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=r"d/weights\.pt: is truncated or corrupt.*; retrain it$"):
        YoloV5Detector.load(tmp_path / "d", hint="retrain it")
    torch.save({"model.0.conv.weight": torch.zeros(1)}, weights)
    with pytest.raises(CheckpointError, match=r"weights\.pt: does not fit the model"):
        YoloV5Detector.load(tmp_path / "d")
    (tmp_path / "d" / "detector.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"detector\.json: is not valid JSON"):
        YoloV5Detector.load(tmp_path / "d")


_SCRIPT = """
import sys
from pathlib import Path
sys.path[:0] = [{here!r}, {repo!r}]
from runtime.env import setup_environment
setup_environment()  # an entry point: before torch loads (importing torchvision makes torch's cache in TMPDIR)
from test_yolov5 import _synthetic
from detectors.yolov5 import YoloV5Detector
out = Path(sys.argv[2])
val = _synthetic(4, 64, seed=1)
if sys.argv[1] == "fit":
    det = YoloV5Detector(imgsz=64, epochs=1, batch=4, mosaic=0.0, conf=0.0)
    det.fit(_synthetic(8, 64, seed=0), val, out / "work")
    det.save(out / "saved")
det = YoloV5Detector.load(Path(sys.argv[3]))
assert len(det.predict(val.images)) == 4
"""


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_fit_and_predict_write_only_under_out_and_the_cache(tmp_path: Path) -> None:
    """Fresh HOME, TMPDIR, cache and working folder: a fit and two concurrent loads + predicts leave
    files only in --out and <cache>/ultralytics (settings, font: created once, reused), matplotlib, torchinductor."""
    repo = Path(__file__).resolve().parents[2]
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT.format(here=str(Path(__file__).resolve().parent), repo=str(repo)))
    home, tmp, cache, cwd, out = (tmp_path / n for n in ("home", "tmp", "cache", "cwd", "out"))
    for d in (home, tmp, cwd):
        d.mkdir()
    keep = ("PATH", "LANG", "LC_ALL", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(HOME=str(home), TMPDIR=str(tmp), LORIS_CACHE=str(cache), PYTHONDONTWRITEBYTECODE="1")
    env = guarded_env(env)

    def run(*args: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, str(script), *args]
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(p: subprocess.Popen[str]) -> None:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-3000:]

    wait(run("fit", str(out), str(out / "saved")))
    assert _files(home) == set() and _files(tmp) == set() and _files(cwd) == set()
    assert {p.split("/")[0] for p in _files(cache)} <= {"ultralytics", "matplotlib", "torchinductor"}
    user = cache / "ultralytics" / "Ultralytics"
    assert (user / "Arial.ttf").is_file()
    settings = json.loads((user / "settings.json").read_text())
    assert settings["sync"] is False and settings["mlflow"] is False
    font = (user / "Arial.ttf").stat()
    before = _files(cache)

    wait(run("predict", str(out), str(out / "saved")))  # a second process reuses the folder as is
    assert _files(cache) == before and (user / "Arial.ttf").stat().st_mtime_ns == font.st_mtime_ns
    assert _files(home) == set() and _files(tmp) == set() and _files(cwd) == set()

    shutil.rmtree(cache)  # two processes creating the folder at once
    procs = [run("predict", str(out), str(out / "saved")) for _ in range(2)]
    for p in procs:
        wait(p)
    assert json.loads((user / "settings.json").read_text())["sync"] is False and (user / "Arial.ttf").is_file()
    assert _files(home) == set() and _files(tmp) == set() and _files(cwd) == set()
