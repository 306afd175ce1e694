"""Dataset validation: every problem in a dataset folder, each naming the file and the reason.

>>> import tempfile, pathlib
>>> problems = check_dataset(pathlib.Path(tempfile.mkdtemp()))
>>> problems[0].reason
'annotations.json not found'
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scans.coco import CATEGORY, decode_segmentation
from scans.readers import ReadError, read_image

REQUIRED_IMAGE_KEYS = ("id", "file_name", "width", "height", "patient_id", "distended")


@dataclass(frozen=True)
class Problem:
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def _check_annotation(ann: dict[str, Any], img: dict[str, Any], where: str, problems: list[Problem]) -> None:
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        problems.append(Problem(where, f"annotation {ann.get('id')} has no valid bbox [x, y, w, h]"))
        return
    width, height = int(img["width"]), int(img["height"])
    if w <= 0 or h <= 0:
        problems.append(Problem(where, f"box [{x}, {y}, {w}, {h}] has no area"))
    if x < 0 or y < 0 or x + w > width + 1e-6 or y + h > height + 1e-6:
        problems.append(Problem(where, f"box [{x}, {y}, {w}, {h}] lies outside the {width}x{height} image"))
    seg = ann.get("segmentation")
    if seg:
        try:
            mask = decode_segmentation(seg, height, width)
        except Exception as exc:  # pycocotools raises bare Exceptions on bad RLE
            problems.append(Problem(where, f"segmentation cannot be decoded ({exc})"))
            return
        inside = np.zeros_like(mask)
        c0, r0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        inside[r0 : int(np.ceil(y + h)), c0 : int(np.ceil(x + w))] = True
        outside = int((mask & ~inside).sum())
        if outside:
            problems.append(Problem(where, f"segmentation has {outside} pixel(s) outside the box"))
    elif bool(img.get("distended")):
        problems.append(Problem(where, "distended image has no segmentation: pixel metrics will treat it as empty"))


def check_dataset(root: Path | str, read_images: bool = True) -> list[Problem]:
    """All problems found in the dataset folder ``root``; an empty list means it is valid."""
    root = Path(root)
    ann_path = root / "annotations.json"
    if not ann_path.is_file():
        return [Problem(str(ann_path), "annotations.json not found")]
    try:
        doc = json.loads(ann_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [Problem(str(ann_path), f"invalid JSON ({exc})")]
    problems: list[Problem] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        return [Problem(str(ann_path), "missing key 'images' (a list)")]
    if not isinstance(doc.get("annotations"), list):
        problems.append(Problem(str(ann_path), "missing key 'annotations' (a list)"))
    cats = [c for c in doc.get("categories", []) if isinstance(c, dict)]
    recess_ids = {c.get("id") for c in cats if c.get("name") == CATEGORY}
    if not recess_ids:
        problems.append(Problem(str(ann_path), f"no category named '{CATEGORY}'"))

    images: dict[Any, dict[str, Any]] = {}
    id_counts = Counter(img.get("id") for img in doc["images"] if isinstance(img, dict))
    for n, img in enumerate(doc["images"]):
        if not isinstance(img, dict):
            problems.append(Problem(str(ann_path), f"images[{n}] is not an object"))
            continue
        missing = [k for k in REQUIRED_IMAGE_KEYS if k not in img]
        where = str(root / str(img.get("file_name", f"images[{n}]")))
        if missing:
            problems.append(Problem(where, f"image entry missing key(s) {', '.join(missing)}"))
            continue
        if id_counts[img["id"]] > 1:
            problems.append(Problem(where, f"duplicate image id {img['id']}"))
            continue
        images[img["id"]] = img
        if read_images:
            try:
                arr = read_image(root / img["file_name"])
            except ReadError as exc:
                problems.append(Problem(str(exc.path), exc.reason))
                continue
            if arr.shape != (int(img["height"]), int(img["width"])):
                problems.append(
                    Problem(
                        where,
                        f"image is {arr.shape[1]}x{arr.shape[0]} but annotations.json says "
                        f"{img['width']}x{img['height']}",
                    )
                )

    per_image: Counter[Any] = Counter()
    for ann in doc.get("annotations", []) if isinstance(doc.get("annotations"), list) else []:
        if not isinstance(ann, dict) or "image_id" not in ann:
            problems.append(Problem(str(ann_path), f"annotation {ann!r:.60} has no image_id"))
            continue
        if recess_ids and ann.get("category_id") not in recess_ids:
            continue
        img = images.get(ann["image_id"])
        if img is None:
            if ann["image_id"] not in id_counts:
                problems.append(
                    Problem(str(ann_path), f"annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
                )
            continue
        per_image[ann["image_id"]] += 1
        _check_annotation(ann, img, str(root / img["file_name"]), problems)
    for image_id, img in images.items():
        if per_image[image_id] == 0:
            problems.append(Problem(str(root / img["file_name"]), "image has no recess box"))
        elif per_image[image_id] > 1:
            problems.append(
                Problem(str(root / img["file_name"]), f"image has {per_image[image_id]} recess boxes; expected one")
            )
    return problems


def summary_line(root: Path | str) -> str:
    doc = json.loads((Path(root) / "annotations.json").read_text())
    imgs = doc["images"]
    n_dist = sum(bool(i["distended"]) for i in imgs)
    n_pat = len({str(i["patient_id"]) for i in imgs})
    return f"{root}: OK, {len(imgs)} images ({n_dist} distended, {len(imgs) - n_dist} normal) from {n_pat} patients"
