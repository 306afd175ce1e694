"""Box fusion: refine a detector's best box with the candidates that agree with it.

NMS keeps the single best-scoring candidate and throws its neighbours away, although each
neighbour is an independent estimate of the same recess edges. Averaging the overlapping
candidates, weighted by score (weighted box fusion restricted to the top cluster), lowers the
edge error (figures in docs/results.md).

>>> import numpy as np
>>> boxes = np.array([[10, 10, 50, 30], [12, 10, 52, 30], [80, 80, 90, 90]], np.float32)
>>> fuse_top(boxes, np.array([0.9, 0.9, 0.5], np.float32)).tolist()
[11.0, 10.0, 51.0, 30.0]
"""

from __future__ import annotations

import numpy as np


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box with each row of ``boxes`` ``[K, 4]``.

    Vectorised counterpart of :func:`scans.records.box_iou` (a scalar pair): a prediction pass
    fuses over hundreds of raw candidates per image.
    """
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


def fuse_top(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Score-weighted mean of the candidates whose IoU with the best-scoring one is >= ``iou``.

    ``boxes`` ``[K, 4]`` and ``scores`` ``[K]`` are raw (pre-NMS) candidates, K >= 1.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) == 0:
        raise ValueError("fuse_top needs at least one candidate")
    top = boxes[int(np.argmax(scores))]
    member = iou_one_to_many(top, boxes) >= iou
    w = scores[member]
    return ((boxes[member] * w[:, None]).sum(0) / w.sum()).astype(np.float32)
