"""Segmentation from an anomaly map: threshold, then closing and opening (3x3), as in the paper.

The morphology is :func:`scans.morphology.close_open`, shared with the evaluation.

>>> import numpy as np
>>> m = np.zeros((7, 7), np.float32); m[2:5, 2:5] = 1.0; m[3, 3] = 0.0; m[0, 6] = 1.0
>>> int(segment(m, 0.5).sum()), int(segment(m, 0.5, postprocess=False).sum())
(9, 9)
"""

from __future__ import annotations

import numpy as np

from scans.morphology import close_open


def segment(maps: np.ndarray, threshold: float, postprocess: bool = True, kernel: int = 3) -> np.ndarray:
    """Boolean masks of ``maps >= threshold`` (the convention of evaluation.metrics), ``[H, W]`` or
    ``[N, H, W]``, closed then opened with a ``kernel`` square.

    ``postprocess=False`` returns the raw threshold (the authors' code scores Dice before post-processing).
    """
    raw = np.asarray(maps) >= threshold
    return close_open(raw, kernel) if postprocess else raw
