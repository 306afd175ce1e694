"""Writing :class:`scans.records.ScanArrays` as an ultralytics (YOLO-format) detection dataset.

Layout under ``root``::

    images/{train,val}/<id>.png   grayscale replicated to 3 channels, uint8
    labels/{train,val}/<id>.txt   one "0 cx cy w h" line (normalised), empty for box-less scans
    data.yaml                     absolute paths, one class "recess"

>>> import numpy as np
>>> box_to_yolo_line((10.0, 20.0, 30.0, 60.0), width=100, height=100)
'0 0.200000 0.400000 0.200000 0.400000'
>>> [round(v, 3) for v in yolo_line_to_box('0 0.2 0.4 0.2 0.4', width=100, height=100)]
[10.0, 20.0, 30.0, 60.0]
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml

from runtime.io import atomic_write, atomic_write_text
from scans.records import ScanArrays

CLASS_NAME = "recess"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[...]`` float images in [0, 1] to uint8 by rounding (the quantisation the PNGs carry)."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def box_to_yolo_line(box: Sequence[float], width: int, height: int, cls: int = 0) -> str:
    """One YOLO label line for an ``(x1, y1, x2, y2)`` box, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    w, h = (x2 - x1) / width, (y2 - y1) / height
    return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def yolo_line_to_box(line: str, width: int, height: int) -> tuple[float, float, float, float]:
    """Inverse of :func:`box_to_yolo_line` (the class is ignored)."""
    _, cx, cy, w, h = (float(v) for v in line.split())
    return ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)


def _write_png(path: Path, gray: np.ndarray) -> None:
    rgb = np.repeat(gray[:, :, None], 3, axis=2)  # ultralytics expects 3 channels
    ok, buf = cv2.imencode(".png", rgb)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    atomic_write(path, lambda p: p.write_bytes(buf.tobytes()))


def write_split(arrays: ScanArrays, root: Path, split: str) -> int:
    """Write one split's images and labels; returns the number of images written."""
    img_dir, lbl_dir = root / "images" / split, root / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    images = to_uint8(arrays.images)
    for i in range(len(arrays)):
        stem = f"{int(arrays.ids[i]):08d}"
        h, w = images[i].shape
        _write_png(img_dir / f"{stem}.png", images[i])
        box = arrays.boxes[i]
        line = "" if np.isnan(box).any() else box_to_yolo_line(box, w, h) + "\n"
        atomic_write_text(lbl_dir / f"{stem}.txt", line)
    return len(arrays)


def write_dataset(train: ScanArrays, val: ScanArrays, root: Path | str) -> Path:
    """(Re)write the train and validation splits under ``root``; returns the ``data.yaml`` path."""
    root = Path(root).resolve()
    for sub in ("images", "labels"):  # a re-fit must not train on a previous fold's leftover scans
        shutil.rmtree(root / sub, ignore_errors=True)
    write_split(train, root, "train")
    write_split(val, root, "val")
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": {0: CLASS_NAME}}
    path = root / "data.yaml"
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path
