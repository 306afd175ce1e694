"""The ground-truth "detector": the annotated boxes with score 1.0 (the upper baseline).

:meth:`Detector.predict` receives images only, so the boxes are given separately, either bound
to a copy of the detector or passed per call:

>>> import numpy as np
>>> images = np.zeros((2, 8, 8), dtype=np.float32)
>>> boxes = np.array([[1, 2, 5, 6], [np.nan] * 4], dtype=np.float32)
>>> dets = GtDetector().with_boxes(boxes).predict(images)   # or GtDetector().predict(images, boxes=boxes)
>>> dets[0].boxes.tolist(), dets[0].scores.tolist(), len(dets[1])
([[1.0, 2.0, 5.0, 6.0]], [1.0], 0)

A scan without a box (NaN row) gets no detection, so :class:`detectors.prior.PriorPolicy` falls
back to the median training box for it, as it does for a detector that finds nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from detectors.base import Detections, Detector, register
from runtime.io import atomic_write_text, load_meta
from scans.records import ScanArrays


@register("gt", display="GT", paper_row="gt")
class GtDetector(Detector):
    """Returns given ground-truth boxes; ``fit`` learns nothing.

    Args:
        boxes: optional ``[N, 4]`` boxes bound to this instance, used by :meth:`predict` when it
            is not given ``boxes``; they must be in the same order as the images predicted.
        **config: ignored, so any detector config section can build it.
    """

    ground_truth = True

    def __init__(self, boxes: np.ndarray | None = None, **config: Any) -> None:
        self.boxes = None if boxes is None else self._check(boxes)

    @staticmethod
    def _check(boxes: np.ndarray) -> np.ndarray:
        b = np.asarray(boxes, dtype=np.float32)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes must be [N, 4], got shape {b.shape}")
        return b

    def with_boxes(self, boxes: np.ndarray) -> GtDetector:
        """A copy of this detector bound to ``boxes`` (``[N, 4]``, one per image to predict)."""
        return GtDetector(boxes=boxes)

    @classmethod
    def for_arrays(cls, arrays: ScanArrays) -> GtDetector:
        """A detector bound to the annotated boxes of ``arrays``."""
        return cls(boxes=arrays.boxes)

    def fit(self, train: ScanArrays, val: ScanArrays, workdir: Path) -> dict[str, Any]:
        return {"detector": "gt", "trained": False, "train_images": len(train), "val_images": len(val)}

    def predict(self, images: np.ndarray, boxes: np.ndarray | None = None) -> list[Detections]:
        """One detection (score 1.0) per image from ``boxes``, or the bound boxes when omitted."""
        b = self.boxes if boxes is None else self._check(boxes)
        if b is None:
            raise ValueError("GtDetector needs boxes: use with_boxes(boxes) or predict(images, boxes=boxes)")
        n = int(np.asarray(images).shape[0])
        if len(b) != n:
            raise ValueError(f"{n} images but {len(b)} ground-truth boxes")
        out = []
        for box in b:
            if np.isnan(box).any():
                out.append(Detections(np.zeros((0, 4)), np.zeros(0)))
            else:
                out.append(Detections(box[None], np.ones(1)))
        return out

    def save(self, directory: Path) -> None:
        # Nothing is learned; the marker file lets load() check it reads the right kind of folder.
        atomic_write_text(Path(directory) / "detector.json", json.dumps({"detector": "gt"}))

    @classmethod
    def load(cls, directory: Path) -> GtDetector:
        path = Path(directory) / "detector.json"
        meta = load_meta(path)
        if meta.get("detector") != "gt":
            raise ValueError(f"{path} is not a saved gt detector")
        return cls()
