"""Binary mask post-processing shared by segmentation and evaluation: closing, then opening."""

from __future__ import annotations

import cv2
import numpy as np


def close_open(masks: np.ndarray, kernel: int = 3) -> np.ndarray:
    """Morphological closing then opening with a ``kernel x kernel`` square, per image.

    Accepts ``[H, W]`` or ``[N, H, W]`` boolean masks and returns the same shape. Closing fills
    pinholes inside a segmented pocket; opening then removes isolated speckle responses.

    >>> m = np.zeros((7, 7), bool); m[2:5, 2:5] = True; m[3, 3] = False; m[0, 6] = True
    >>> int(close_open(m).sum())  # hole filled, lone pixel removed
    9
    >>> bool(close_open(np.ones((5, 5), bool)).all())  # the image border is not eroded
    True
    """
    if kernel <= 1:
        return masks.astype(bool, copy=True)
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (kernel, kernel))
    arr = np.asarray(masks)
    flat = arr.reshape((-1,) + arr.shape[-2:]).astype(np.uint8)
    out = np.empty_like(flat)
    # OpenCV's default border is neutral (max for erosion, min for dilation): a constant 0 would
    # erode every mask touching the image edge.
    for i in range(flat.shape[0]):  # one C call per image; opencv has no batched morphology
        closed = cv2.morphologyEx(flat[i], cv2.MORPH_CLOSE, k)
        out[i] = cv2.morphologyEx(closed, cv2.MORPH_OPEN, k)
    return out.reshape(arr.shape).astype(bool)
