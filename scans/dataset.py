"""Loading a dataset folder into scans and into model-sized arrays."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from scans.coco import load_coco
from scans.readers import read_image, resize_image, resize_mask
from scans.records import Scan, ScanArrays


def load_dataset(root: Path | str) -> list[Scan]:
    """Scans of the dataset folder ``root`` (``annotations.json`` + ``images/``), their paths absolute
    so that a relative ``root`` means the same folder after any later join or change of directory."""
    root = Path(os.path.abspath(root))
    return load_coco(root / "annotations.json", root)


def _prepare_one(scan: Scan, size: int, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    image = read_image(scan.path, frame=frame)
    h, w = image.shape
    if (h, w) != (scan.height, scan.width):
        raise ValueError(f"{scan.path}: image is {w}x{h} but annotations.json says {scan.width}x{scan.height}")
    sx, sy = size / w, size / h
    box = np.full(4, np.nan, dtype=np.float32)
    if scan.box is not None:
        box[:] = (scan.box[0] * sx, scan.box[1] * sy, scan.box[2] * sx, scan.box[3] * sy)
    return resize_image(image, size), box, resize_mask(scan.anomaly_mask(), size), (sx, sy)


def to_arrays(scans: Sequence[Scan], size: int = 256, frame: int = 0, workers: int = 2) -> ScanArrays:
    """Read and resize scans to ``size x size`` (see :mod:`scans.readers` for the rules).

    Raises:
        ReadError: for the first unreadable image; run ``python -m scans check`` to list all.
    """
    n = len(scans)
    images = np.zeros((n, size, size), dtype=np.float32)
    boxes = np.zeros((n, 4), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    scale = np.zeros((n, 2), dtype=np.float32)
    # cv2 releases the GIL while decoding, so threads overlap the reads.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, (img, box, mask, sc) in enumerate(pool.map(lambda s: _prepare_one(s, size, frame), scans)):
            images[i], boxes[i], masks[i], scale[i] = img, box, mask, sc
    return ScanArrays(
        images=images,
        boxes=boxes,
        masks=masks,
        labels=np.array([s.label for s in scans], dtype=np.int64),
        ids=np.array([s.id for s in scans], dtype=np.int64),
        patients=[s.patient for s in scans],
        scale=scale,
    )
