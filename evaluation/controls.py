"""Prior-only controls: what the location prior alone scores, with no image used.

A box that is drawn differently on distended scans (taller, larger) gives the answer away: its
height ranks the scans, and a map that is 1 inside the box and 0 outside localises the pocket.
Every table carries these controls for every prior source, computed from the very boxes LoRIS
masks, so a reader sees how much of a result the annotation (or the detector) explains.

* ``control_height`` / ``control_area``: image score = the prior box's height / area;
* both share the **box-indicator map** (1 inside the masked box, margin included, 0 outside) for
  P-AUROC and Dice.

>>> boxes = np.array([[2.0, 2.0, 5.0, 4.0], [1.0, 1.0, 6.0, 6.0]])
>>> {k: v.tolist() for k, v in control_scores(boxes).items()}
{'control_height': [2.0, 5.0], 'control_area': [6.0, 25.0]}
>>> float(box_indicator(boxes[:1], 8, 8).sum())  # columns 2-4, rows 2-3
6.0
"""

from __future__ import annotations

import numpy as np

from scans.records import box_mask

CONTROLS = ("control_height", "control_area")
CONTROL_NAMES = {"control_height": "Prior only: box height", "control_area": "Prior only: box area"}


def control_scores(boxes: np.ndarray) -> dict[str, np.ndarray]:
    """``{control: [N] image scores}`` from ``[N, 4]`` (x1, y1, x2, y2) prior boxes; NaN boxes score 0."""
    b = np.nan_to_num(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), nan=0.0)
    h = np.clip(b[:, 3] - b[:, 1], 0.0, None)
    w = np.clip(b[:, 2] - b[:, 0], 0.0, None)
    return {"control_height": h, "control_area": h * w}


def box_indicator(boxes: np.ndarray, height: int, width: int, margin: float = 0.0) -> np.ndarray:
    """``[N, H, W]`` float32 map, 1 on the pixels LoRIS blacks out for each box (``margin`` px around it)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((len(b), height, width), dtype=np.float32)
    grow = np.array([-margin, -margin, margin, margin])
    for i, box in enumerate(b):  # one slice assignment per box; N is a fold's test part
        if np.isfinite(box).all():
            out[i] = box_mask(np.clip(box + grow, 0.0, [width, height, width, height]), height, width)
    return out
