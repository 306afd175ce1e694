"""COCO annotations for LoRIS datasets: load, save, and segmentation decoding (:mod:`scans.rle`).

A dataset is a folder with ``images/`` and ``annotations.json`` (see the README, "Your own
data"). Each image carries ``patient_id`` and ``distended``; each has exactly one annotation of
category ``recess`` whose ``bbox`` is the location prior and whose ``segmentation`` is the recess.

>>> import tempfile, pathlib
>>> from scans.records import Scan
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> s = Scan(1, root / "images/a.png", "p1", 0, (1.0, 2.0, 11.0, 7.0), 32, 32)
>>> save_coco(root / "annotations.json", [s], root)
>>> load_coco(root / "annotations.json", root)[0].box
(1.0, 2.0, 11.0, 7.0)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.io import atomic_write_text
from scans.records import Scan
from scans.rle import decode_segmentation, encode_mask  # noqa: F401 (public here too)

CATEGORY = "recess"


class AnnotationError(ValueError):
    """``annotations.json`` is malformed; the message names the file and the problem."""


def load_coco(path: Path | str, root: Path | str | None = None) -> list[Scan]:
    """Read ``annotations.json`` into scans sorted by id.

    Raises:
        AnnotationError: naming the file and the first structural problem found.
            ``python -m scans check`` lists every problem instead.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AnnotationError(f"{path}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: invalid JSON ({exc})") from exc
    try:
        cat_ids = {c["id"] for c in doc.get("categories", []) if c.get("name") == CATEGORY}
        anns: dict[int, dict[str, Any]] = {}
        for ann in doc.get("annotations", []):
            if cat_ids and ann.get("category_id") not in cat_ids:
                continue
            if ann["image_id"] in anns:
                raise AnnotationError(f"{path}: image {ann['image_id']} has more than one '{CATEGORY}' annotation")
            anns[ann["image_id"]] = ann
        scans = []
        for img in doc["images"]:
            ann = anns.get(img["id"])
            box = None
            seg = None
            if ann is not None:
                x, y, w, h = (float(v) for v in ann["bbox"])
                box = (x, y, x + w, y + h)
                seg = ann.get("segmentation") or None
            scans.append(
                Scan(
                    id=int(img["id"]),
                    path=root / img["file_name"],
                    patient=str(img["patient_id"]),
                    label=1 if bool(img["distended"]) else 0,
                    box=box,
                    width=int(img["width"]),
                    height=int(img["height"]),
                    segmentation=seg,
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, AnnotationError):
            raise
        raise AnnotationError(f"{path}: malformed COCO ({exc.__class__.__name__}: {exc})") from exc
    return sorted(scans, key=lambda s: s.id)


def to_coco(scans: Sequence[Scan], root: Path | str) -> dict[str, Any]:
    """Scans -> COCO dict with file names relative to ``root``."""
    root = Path(root)
    images, annotations = [], []
    for s in scans:
        try:
            rel = s.path.relative_to(root).as_posix()
        except ValueError:
            rel = s.path.as_posix()
        images.append(
            {
                "id": s.id,
                "file_name": rel,
                "width": s.width,
                "height": s.height,
                "patient_id": s.patient,
                "distended": bool(s.label == 1),
            }
        )
        if s.box is not None:
            x1, y1, x2, y2 = s.box
            annotations.append(
                {
                    "id": s.id,
                    "image_id": s.id,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "segmentation": s.segmentation or [],
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": CATEGORY, "supercategory": "knee"}],
    }


def save_coco(path: Path | str, scans: Sequence[Scan], root: Path | str | None = None) -> None:
    path = Path(path)
    atomic_write_text(path, json.dumps(to_coco(scans, root if root is not None else path.parent)))
