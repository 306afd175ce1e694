"""Location priors: one box per image from a detector (or the ground truth), expanded by one rule.

>>> import numpy as np
>>> expand_all(np.array([[10.0, 20.0, 30.0, 40.0]]), Expansion(up=0.5), 64).tolist()
[[10.0, 10.0, 30.0, 40.0]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detectors.base import Detections, Detector
from detectors.gt import GtDetector
from detectors.prior import PriorPolicy, expand_box
from scans.records import ScanArrays


@dataclass(frozen=True)
class Expansion:
    """Growth of every prior and U-Net training box (``detector.expand_up``/``expand_side``)."""

    up: float = 0.0
    side: float = 0.0


def expand_all(boxes: np.ndarray, expansion: Expansion, size: int) -> np.ndarray:
    """Apply the configured expansion to every box (the same rule for training and inference)."""
    if expansion.up == 0 and expansion.side == 0:
        return boxes.astype(np.float32, copy=True)
    grown = [expand_box(b, size, size, up=expansion.up, side=expansion.side) for b in boxes]
    return np.array(grown, dtype=np.float32)


def training_subset(arrays: ScanArrays, index: np.ndarray, train_classes: str) -> np.ndarray:
    """The indices a model may train on: normal scans only unless the ``all`` opt-in is set."""
    if train_classes == "all":
        return index
    if train_classes != "normal":
        raise ValueError(f"detector.train_classes must be 'normal' or 'all', not {train_classes!r}")
    return index[arrays.labels[index] == 0]


def fold_policy(arrays: ScanArrays, train_idx: np.ndarray, threshold: float, train_classes: str) -> PriorPolicy:
    """The top-1 policy of a fold: ``threshold``, falling back to the median box of its training scans."""
    size = arrays.images.shape[-1]
    median = PriorPolicy.median_of(arrays.boxes[training_subset(arrays, train_idx, train_classes)], size, size)
    return PriorPolicy(threshold, median)


@dataclass
class Priors:
    """One prior box per image, with where it came from and the raw detections behind it."""

    boxes: np.ndarray  # [N, 4] after expansion
    raw_boxes: np.ndarray  # [N, 4] before expansion (scored against ground truth)
    sources: list[str]  # per image: "gt", "detector" or "fallback" (detectors.prior.Prior.source)
    confidences: np.ndarray
    detections: list[Detections] = field(default_factory=list)
    ground_truth: bool = False  # the boxes are the annotations themselves

    @property
    def fallbacks(self) -> int:
        return sum(s == "fallback" for s in self.sources)


def predict_priors(
    detector: Detector, arrays: ScanArrays, policy: PriorPolicy, expansion: Expansion, batch_size: int = 16
) -> Priors:
    """Priors for ``arrays``: a ground-truth detector's boxes as annotated, else the top-1 ``policy``."""
    n, size = len(arrays), arrays.images.shape[-1]
    if detector.ground_truth:
        raw = arrays.boxes.astype(np.float32)
        dets = GtDetector.for_arrays(arrays).predict(arrays.images)
        return Priors(expand_all(raw, expansion, size), raw, ["gt"] * n, np.ones(n, np.float32), dets, True)
    dets = []
    for s in range(0, n, batch_size):
        dets.extend(detector.predict(arrays.images[s : s + batch_size]))
    chosen = policy.select_all(dets, size, size)
    raw = np.array([p.box for p in chosen], dtype=np.float32).reshape(n, 4)
    scores = np.array([p.score for p in chosen], np.float32)
    return Priors(expand_all(raw, expansion, size), raw, [p.source for p in chosen], scores, dets)
