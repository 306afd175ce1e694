"""Image primitives shared by the readers (:mod:`scans.readers`, :mod:`scans.dicom`): the read error and
the conversion of a decoded array to 2-D float32 grayscale in [0, 1].

>>> import numpy as np
>>> to_unit_gray(np.array([[0, 255]], dtype=np.uint8), "a.png").tolist()
[[0.0, 1.0]]
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class ReadError(ValueError):
    """An image could not be read; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def to_unit_gray(
    arr: np.ndarray, path: Path | str, max_value: float | None = None, rgb_order: str = "BGR"
) -> np.ndarray:
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[..., 0]
        elif arr.shape[2] in (3, 4):
            code = {
                ("BGR", 3): cv2.COLOR_BGR2GRAY,
                ("BGR", 4): cv2.COLOR_BGRA2GRAY,
                ("RGB", 3): cv2.COLOR_RGB2GRAY,
                ("RGB", 4): cv2.COLOR_RGBA2GRAY,
            }[(rgb_order, arr.shape[2])]
            if arr.dtype not in (np.uint8, np.uint16, np.float32):
                arr = arr.astype(np.float32)
            arr = cv2.cvtColor(arr, code)
        else:
            raise ReadError(path, f"unsupported channel count {arr.shape[2]}")
    if arr.ndim != 2:
        raise ReadError(path, f"unsupported image shape {arr.shape}")
    if arr.size == 0:
        raise ReadError(path, "empty image")
    if max_value is None:
        if arr.dtype == np.uint8:
            max_value = 255.0
        elif arr.dtype == np.uint16:
            max_value = 65535.0
        elif np.issubdtype(arr.dtype, np.integer):
            max_value = float(np.iinfo(arr.dtype).max)
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if 0.0 <= lo and hi <= 1.0:
                return np.ascontiguousarray(arr, dtype=np.float32)
            out = (arr.astype(np.float32) - lo) / max(hi - lo, 1e-12)
            return np.ascontiguousarray(out, dtype=np.float32)
    out = arr.astype(np.float32) / np.float32(max_value)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)
