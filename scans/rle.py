"""COCO segmentations <-> boolean masks: polygons and (compressed) RLE decoded, masks encoded as
compressed RLE with a JSON-safe ``counts``.

>>> import numpy as np
>>> m = np.zeros((4, 5), dtype=bool); m[1:3, 2:4] = True
>>> bool((decode_segmentation(encode_mask(m), 4, 5) == m).all())
True
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO polygons, uncompressed RLE or compressed RLE -> boolean ``[height, width]`` mask."""
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, height, width)
        elif isinstance(rle.get("counts"), str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    else:
        raise ValueError(f"unsupported segmentation type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Boolean mask -> compressed RLE with a JSON-safe string ``counts``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
