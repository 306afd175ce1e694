"""Detector evaluation on arrays: top-1 precision at IoU 0.5 and COCO mAP via pycocotools.

Every detector is scored by the same code on the same ground truth, built here from arrays:

* ``gt_boxes`` ``[N, 4]`` ``(x1, y1, x2, y2)`` (NaN rows = no ground truth for that image),
* ``image_ids`` ``[N]`` ints,
* ``predictions``: one ``(boxes [K, 4] (x1, y1, x2, y2), scores [K])`` per image, K may be 0,
* ``image_size``: ``(height, width)`` shared by all images, or ``[N, 2]`` per image.

>>> gt = np.array([[10, 10, 50, 30], [20, 20, 60, 40]], float)
>>> preds = [(gt[:1], np.array([0.9])), (np.array([[0, 0, 5, 5]], float), np.array([0.8]))]
>>> m = detection_metrics(gt, np.array([1, 2]), preds, (64, 64), labels=np.array([0, 1]))
>>> m["precision"], m["precision_normal"], m["precision_distended"], round(m["map50"], 3)
(0.5, 1.0, 0.0, 0.505)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from runtime.io import atomic_write_text
from scans.records import box_iou

CATEGORY_ID = 1
Prediction = tuple[np.ndarray, np.ndarray]


def _sizes(image_size: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    sizes = np.asarray(image_size, dtype=np.int64)
    if sizes.shape == (2,):
        sizes = np.broadcast_to(sizes, (n, 2))
    if sizes.shape != (n, 2):
        raise ValueError(f"image_size must be (height, width) or [N, 2]; got shape {sizes.shape}")
    return sizes


def _xywh(box: Sequence[float] | np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _check(gt_boxes: np.ndarray, image_ids: np.ndarray, predictions: Sequence[Prediction]) -> None:
    if gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"gt_boxes must be [N, 4]; got {gt_boxes.shape}")
    if not (len(gt_boxes) == len(image_ids) == len(predictions)):
        raise ValueError("gt_boxes, image_ids and predictions must have one entry per image")
    if len(np.unique(image_ids)) != len(image_ids):
        raise ValueError("image_ids must be unique")


def coco_ground_truth(
    gt_boxes: np.ndarray, image_ids: np.ndarray, image_size: Sequence[int] | np.ndarray
) -> dict[str, Any]:
    """A COCO detection dataset dict: one ``recess`` box per image (none for NaN rows).

    >>> coco_ground_truth(np.array([[1.0, 2.0, 5.0, 4.0]]), np.array([7]), (8, 8))["annotations"][0]["bbox"]
    [1.0, 2.0, 4.0, 2.0]
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64)
    image_ids = np.asarray(image_ids).ravel()
    sizes = _sizes(image_size, len(image_ids))
    images = [{"id": int(i), "height": int(h), "width": int(w)} for i, (h, w) in zip(image_ids, sizes)]
    anns: list[dict[str, Any]] = []
    for i, box in zip(image_ids, gt_boxes):
        if not np.all(np.isfinite(box)):
            continue
        xywh = _xywh(box)
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": int(i),
                "category_id": CATEGORY_ID,
                "bbox": xywh,
                "area": xywh[2] * xywh[3],
                "iscrowd": 0,
            }
        )
    return {"images": images, "annotations": anns, "categories": [{"id": CATEGORY_ID, "name": "recess"}]}


def coco_results(image_ids: np.ndarray, predictions: Sequence[Prediction]) -> list[dict[str, Any]]:
    """COCO results list ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``.

    >>> coco_results(np.array([3]), [(np.array([[1.0, 1.0, 4.0, 3.0]]), np.array([0.5]))])
    [{'image_id': 3, 'category_id': 1, 'bbox': [1.0, 1.0, 3.0, 2.0], 'score': 0.5}]
    """
    out: list[dict[str, Any]] = []
    for i, (boxes, scores) in zip(np.asarray(image_ids).ravel(), predictions):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if len(boxes) != len(scores):
            raise ValueError(f"image {i}: {len(boxes)} boxes but {len(scores)} scores")
        for b, s in zip(boxes, scores):
            out.append({"image_id": int(i), "category_id": CATEGORY_ID, "bbox": _xywh(b), "score": float(s)})
    return out


def write_coco_results(path: Path | str, image_ids: np.ndarray, predictions: Sequence[Prediction]) -> None:
    """Write :func:`coco_results` as JSON atomically (loadable by ``COCO.loadRes``)."""
    atomic_write_text(path, json.dumps(coco_results(image_ids, predictions)))


def coco_map(
    gt_boxes: np.ndarray,
    image_ids: np.ndarray,
    predictions: Sequence[Prediction],
    image_size: Sequence[int] | np.ndarray,
) -> dict[str, float]:
    """pycocotools bbox mAP@50, mAP@75 and mAP@50:95 (maxDets 100, all areas).

    NaN when there is no ground-truth box; 0 when there is ground truth but no prediction.
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64)
    image_ids = np.asarray(image_ids).ravel()
    _check(gt_boxes, image_ids, predictions)
    dataset = coco_ground_truth(gt_boxes, image_ids, image_size)
    if not dataset["annotations"]:
        return {"map50": math.nan, "map75": math.nan, "map50_95": math.nan}
    results = coco_results(image_ids, predictions)
    if not results:  # COCO.loadRes rejects an empty list
        return {"map50": 0.0, "map75": 0.0, "map50_95": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = [int(i) for i in image_ids]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats: [0] AP@[.5:.95], [1] AP@.5, [2] AP@.75; -1 means "undefined" in pycocotools
    stats = [float(s) if s >= 0 else math.nan for s in ev.stats[:3]]
    return {"map50": stats[1], "map75": stats[2], "map50_95": stats[0]}


def top1_boxes(predictions: Sequence[Prediction]) -> np.ndarray:
    """``[N, 4]`` highest-scoring box per image; NaN rows where nothing was detected."""
    out = np.full((len(predictions), 4), np.nan)
    for k, (boxes, scores) in enumerate(predictions):
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.size:
            out[k] = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[int(np.argmax(scores))]
    return out


def top1_iou(gt_boxes: np.ndarray, predictions: Sequence[Prediction]) -> np.ndarray:
    """``[N]`` IoU of each image's top-1 box with its ground truth (NaN if either is missing)."""
    top = top1_boxes(predictions)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64)
    return np.array(
        [
            box_iou(g, p) if np.all(np.isfinite(g)) and np.all(np.isfinite(p)) else math.nan
            for g, p in zip(gt_boxes, top)
        ]
    )


def top1_precision(gt_boxes: np.ndarray, predictions: Sequence[Prediction], iou: float = 0.5) -> dict[str, float]:
    """Precision of the top-1 box per image at ``IoU >= iou``, plus its recall and misses.

    ``precision`` = hits / images with a detection; ``recall`` = hits / images with ground
    truth (an image with no detection lowers recall, not precision); ``no_detection`` counts them.

    >>> top1_precision(np.array([[0, 0, 4, 4.0]]), [(np.array([[0, 0, 4, 4.0]]), np.array([1.0]))])
    {'precision': 1.0, 'recall': 1.0, 'no_detection': 0.0}
    """
    ious = top1_iou(gt_boxes, predictions)
    has_pred = np.array([np.asarray(s).size > 0 for _, s in predictions], dtype=bool)
    has_gt = np.all(np.isfinite(np.asarray(gt_boxes, dtype=np.float64)), axis=1)
    hits = np.nan_to_num(ious, nan=0.0) >= iou
    n_pred, n_gt = int((has_pred & has_gt).sum()), int(has_gt.sum())
    return {
        "precision": float(hits.sum() / n_pred) if n_pred else math.nan,
        "recall": float(hits.sum() / n_gt) if n_gt else math.nan,
        "no_detection": float((~has_pred).sum()),
    }


def detection_metrics(
    gt_boxes: np.ndarray,
    image_ids: np.ndarray,
    predictions: Sequence[Prediction],
    image_size: Sequence[int] | np.ndarray,
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Top-1 precision/recall and COCO mAPs on all images, and per class when ``labels`` given.

    Keys: ``precision``, ``recall``, ``no_detection``, ``map50``, ``map75``, ``map50_95``; with
    ``labels`` the same again suffixed ``_normal`` (label 0) and ``_distended`` (label 1).
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64)
    image_ids = np.asarray(image_ids).ravel()
    _check(gt_boxes, image_ids, predictions)
    sizes = _sizes(image_size, len(image_ids))
    subsets: dict[str, np.ndarray] = {"": np.ones(len(image_ids), dtype=bool)}
    if labels is not None:
        labels = np.asarray(labels).ravel()
        subsets["_normal"] = labels == 0
        subsets["_distended"] = labels == 1
    out: dict[str, float] = {}
    for suffix, sel in subsets.items():
        idx = np.flatnonzero(sel)
        if idx.size == 0:
            continue
        preds = [predictions[int(i)] for i in idx]
        part = top1_precision(gt_boxes[idx], preds)
        part.update(coco_map(gt_boxes[idx], image_ids[idx], preds, sizes[idx]))
        out.update({k + suffix: v for k, v in part.items()})
    return out
