"""Typed records shared by every stage: a scan, its box, and a batch of prepared arrays.

Box convention (used everywhere in LoRIS): ``(x1, y1, x2, y2)`` in continuous pixel
coordinates, i.e. COCO ``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)``. The pixels a box
covers are those whose index range is given by :func:`box_to_pixels` (corners inclusive).

>>> box_to_pixels((10.0, 20.0, 30.0, 25.0), height=64, width=64)
(10, 20, 29, 24)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]

NORMAL = 0
DISTENDED = 1


@dataclass(frozen=True)
class Scan:
    """One annotated (or unannotated) ultrasound image.

    ``label`` is 1 for a distended recess, 0 for a normal one, and -1 when unknown
    (new scans given to ``predict``). ``segmentation`` is the raw COCO segmentation
    (polygons or RLE) of the recess; it becomes the anomaly mask only for distended scans.
    """

    id: int
    path: Path
    patient: str
    label: int
    box: Box | None
    width: int
    height: int
    segmentation: Any = field(default=None, compare=False, repr=False)

    @property
    def distended(self) -> bool:
        return self.label == DISTENDED

    def anomaly_mask(self) -> np.ndarray:
        """Boolean ``[height, width]`` mask: the recess segmentation of distended scans, else empty."""
        if self.label != DISTENDED or not self.segmentation:
            return np.zeros((self.height, self.width), dtype=bool)
        from scans.rle import decode_segmentation

        return decode_segmentation(self.segmentation, self.height, self.width)


def box_to_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Inclusive integer pixel bounds ``(c0, r0, c1, r1)`` of a continuous box, clipped to the image.

    A pixel is covered when its unit square overlaps the box, so any box of positive size
    covers at least one pixel.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    c0 = min(max(int(math.floor(x1)), 0), width - 1)
    r0 = min(max(int(math.floor(y1)), 0), height - 1)
    c1 = min(max(int(math.ceil(x2)) - 1, c0), width - 1)
    r1 = min(max(int(math.ceil(y2)) - 1, r0), height - 1)
    return c0, r0, c1, r1


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """Boolean mask of the pixels :func:`box_to_pixels` covers."""
    c0, r0, c1, r1 = box_to_pixels(box, height, width)
    m = np.zeros((height, width), dtype=bool)
    m[r0 : r1 + 1, c0 : c1 + 1] = True
    return m


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class ScanArrays:
    """Scans read and resized to one model size, as arrays ready for the models.

    Attributes:
        images: ``[N, S, S]`` float32 grayscale in [0, 1].
        boxes: ``[N, 4]`` float32 ground-truth boxes in resized coordinates (NaN when absent).
        masks: ``[N, S, S]`` bool anomaly masks (empty for normal scans).
        labels: ``[N]`` int64, 1 distended, 0 normal, -1 unknown.
        ids: ``[N]`` int64 scan ids.
        patients: patient id per scan.
        scale: ``[N, 2]`` float32 ``(sx, sy)`` from original to resized pixels.
    """

    images: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    patients: list[str]
    scale: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Sequence[int] | np.ndarray) -> ScanArrays:
        idx = np.asarray(index, dtype=np.int64)
        return ScanArrays(
            images=self.images[idx],
            boxes=self.boxes[idx],
            masks=self.masks[idx],
            labels=self.labels[idx],
            ids=self.ids[idx],
            patients=[self.patients[i] for i in idx],
            scale=self.scale[idx],
        )
