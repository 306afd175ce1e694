"""The prior policy shared by all detectors: top-1 box, threshold, and a documented fallback.

The prior is the highest-confidence detection at or above ``threshold``. When there is none,
the prior is the median training box (stored normalised to the image size, so it scales to any
image) and is marked ``source="fallback"``.

>>> import numpy as np
>>> from detectors.base import Detections
>>> policy = PriorPolicy(threshold=0.3, median_box=(0.25, 0.5, 0.75, 0.6))
>>> policy.select(Detections(np.zeros((0, 4)), np.zeros(0)), 100, 100).source
'fallback'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detectors.base import Detections


@dataclass(frozen=True)
class Prior:
    box: tuple[float, float, float, float]
    score: float
    source: str  # "gt", "detector" or "fallback"


@dataclass(frozen=True)
class PriorPolicy:
    """Chooses one box per image from detections.

    Attributes:
        threshold: minimum confidence for a detection to be used.
        median_box: fallback box normalised to [0, 1] by image width and height.
    """

    threshold: float
    median_box: tuple[float, float, float, float]

    @staticmethod
    def median_of(boxes: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
        """Element-wise median of ``[N, 4]`` training boxes, normalised by the image size."""
        b = np.asarray(boxes, dtype=np.float64)
        b = b[~np.isnan(b).any(axis=1)]
        if len(b) == 0:
            raise ValueError("no training boxes to take a fallback median from")
        med = np.median(b, axis=0) / np.array([width, height, width, height])
        return tuple(float(v) for v in med)  # type: ignore[return-value]

    def select(self, detections: Detections, width: int, height: int) -> Prior:
        keep = detections.scores >= self.threshold
        if keep.any():
            i = int(np.flatnonzero(keep)[np.argmax(detections.scores[keep])])
            x1, y1, x2, y2 = (float(v) for v in detections.boxes[i])
            x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
            y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
            if x2 > x1 and y2 > y1:
                return Prior((x1, y1, x2, y2), float(detections.scores[i]), "detector")
        m = self.median_box
        return Prior((m[0] * width, m[1] * height, m[2] * width, m[3] * height), 0.0, "fallback")

    def select_all(self, detections: Sequence[Detections], width: int, height: int) -> list[Prior]:
        return [self.select(d, width, height) for d in detections]


def expand_box(
    box: Sequence[float], width: int, height: int, *, up: float = 0.0, down: float = 0.0, side: float = 0.0
) -> tuple[float, float, float, float]:
    """Grow a box by fractions of its own height (``up``, ``down``) and width (``side``, each side).

    Used as the distension remedy: a detector trained on normal recesses finds the recess floor
    but not a pocket that lifts the fat pad, so the prior is grown upward. The same expansion is
    applied to the U-Net's training boxes so training and inference see the same mask geometry.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    return (
        max(0.0, x1 - side * w),
        max(0.0, y1 - up * h),
        min(float(width), x2 + side * w),
        min(float(height), y2 + down * h),
    )
