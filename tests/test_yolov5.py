"""YOLOv5u (ultralytics) detector: offline fit, save/load without pickles, predictions, YOLO labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors import DETECTORS, Detections, PriorPolicy, build_detector
from detectors.yolo_format import box_to_yolo_line, write_dataset, yolo_line_to_box
from detectors.yolov5 import YoloV5Detector
from scans.records import ScanArrays


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
    assert png.shape == (64, 64, 3) and (png[..., 0] == png[..., 2]).all()  # grayscale x 3
    assert box_to_yolo_line((-5, 0, 32, 70), 64, 64) == "0 0.250000 0.500000 0.500000 1.000000"  # clipped


def test_registered() -> None:
    assert DETECTORS["yolov5"] is YoloV5Detector
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detector("yolov5", imgsz=100)
    with pytest.raises(ValueError, match="unknown yolov5 config keys"):
        build_detector("yolov5", epoch=3)  # a typo must not silently train with defaults


@pytest.mark.parametrize("name", ["yolov5.yaml", "yolov5_paper.yaml"])
def test_shipped_configs_load(name: str) -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "detectors" / name
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
