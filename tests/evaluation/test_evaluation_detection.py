"""Detection metrics checked against pycocotools run directly on the written COCO files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from evaluation.detection import (
    coco_ground_truth,
    detection_metrics,
    top1_iou,
    top1_precision,
    write_coco_results,
)
from runtime.io import atomic_write_text

SIZE = (64, 64)


def _direct_coco(tmp: Path, gt: np.ndarray, ids: np.ndarray, preds: list) -> list[float]:
    """pycocotools from files on disk, the way its own docs use it."""
    atomic_write_text(tmp / "gt.json", json.dumps(coco_ground_truth(gt, ids, SIZE)))
    write_coco_results(tmp / "dt.json", ids, preds)
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(tmp / "gt.json"))
        ev = COCOeval(cg, cg.loadRes(str(tmp / "dt.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats[:3]]


def _gt(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(2, 30, (n, 2))
    wh = rng.uniform(8, 30, (n, 2))
    return np.hstack([xy, xy + wh])


def test_perfect_predictions() -> None:
    gt = _gt(6)
    preds = [(g[None], np.array([0.9])) for g in gt]
    m = detection_metrics(gt, np.arange(6) + 10, preds, SIZE)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["map50"] == pytest.approx(1.0) and m["map75"] == pytest.approx(1.0)
    assert m["map50_95"] == pytest.approx(1.0)


def test_known_iou_between_thresholds() -> None:
    gt = np.array([[0, 0, 10, 10.0]])
    pred = [(np.array([[0, 0, 10, 7.0]]), np.array([1.0]))]  # IoU 0.7
    assert top1_iou(gt, pred)[0] == pytest.approx(0.7)
    m = detection_metrics(gt, np.array([1]), pred, SIZE)
    assert m["precision"] == 1.0 and m["map50"] == pytest.approx(1.0) and m["map75"] == 0.0
    # hit at 0.5..0.7 -> 5 of 10 IoU thresholds
    assert m["map50_95"] == pytest.approx(0.5)
    # inverted scores cannot matter with one box per image, but wrong box as top-1 does
    two = [(np.array([[40, 40, 50, 50.0], [0, 0, 10, 10.0]]), np.array([0.9, 0.1]))]
    assert top1_precision(gt, two)["precision"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools_on_random_predictions(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = _gt(20, seed)
    preds = []
    for g in gt:
        k = int(rng.integers(0, 4))  # some images get no box at all
        boxes = g + rng.normal(0, 4, (k, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        preds.append((boxes, rng.random(k)))
    ids = np.arange(20) * 3 + 1
    m = detection_metrics(gt, ids, preds, SIZE)
    direct = _direct_coco(tmp_path, gt, ids, preds)
    assert [m["map50_95"], m["map50"], m["map75"]] == pytest.approx(direct, abs=1e-12)
    assert m["no_detection"] == sum(len(s) == 0 for _, s in preds)


def test_subsets_and_missing_detections() -> None:
    gt = _gt(4)
    preds = [
        (gt[0][None], np.array([0.5])),
        (np.zeros((0, 4)), np.zeros(0)),
        (gt[2][None] + 30, np.array([0.5])),
        (gt[3][None], np.array([0.5])),
    ]
    labels = np.array([0, 0, 1, 1])
    m = detection_metrics(gt, np.arange(4), preds, SIZE, labels=labels)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)
    assert m["precision_normal"] == 1.0 and m["recall_normal"] == 0.5 and m["no_detection_normal"] == 1
    assert m["precision_distended"] == 0.5
    assert m["map50_distended"] == pytest.approx(detection_metrics(gt[2:], np.arange(2, 4), preds[2:], SIZE)["map50"])


def test_no_predictions_at_all_gives_zero_map() -> None:
    gt = _gt(3)
    empty = [(np.zeros((0, 4)), np.zeros(0))] * 3
    m = detection_metrics(gt, np.arange(3), empty, SIZE)
    assert m["map50"] == 0.0 and np.isnan(m["precision"]) and m["recall"] == 0.0


def test_results_json_format(tmp_path: Path) -> None:
    write_coco_results(tmp_path / "r.json", np.array([5]), [(np.array([[1, 2, 4, 8.0]]), np.array([0.25]))])
    assert json.loads((tmp_path / "r.json").read_text()) == [
        {"image_id": 5, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.25}
    ]
    with pytest.raises(ValueError, match="unique"):
        detection_metrics(_gt(2), np.array([1, 1]), [(np.zeros((0, 4)), np.zeros(0))] * 2, SIZE)
