"""Dataset validation: every problem in a dataset folder, each naming the file and the reason.

The schema is strict (see the README, "Your own data"): ``annotations.json`` is an object; image
ids and sizes are integers, ``distended`` a JSON boolean, ``patient_id`` a string or integer,
``file_name`` a relative path that resolves inside the folder (symlinks included), boxes four
finite numbers; ``splits.json``, when present, names known ids and keeps patients apart. No input
raises: every type error becomes a named problem.

>>> import tempfile, pathlib
>>> problems = check_dataset(pathlib.Path(tempfile.mkdtemp()))
>>> problems[0].reason
'annotations.json not found'
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scans.coco import CATEGORY, decode_segmentation
from scans.readers import ReadError, read_image
from scans.records import Scan

REQUIRED_IMAGE_KEYS = ("id", "file_name", "width", "height", "patient_id", "distended")


@dataclass(frozen=True)
class Problem:
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _short(v: Any) -> str:
    return f"{v!r:.60}"


def _check_annotation(ann: dict[str, Any], img: dict[str, Any], where: str, problems: list[Problem]) -> None:
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        problems.append(
            Problem(where, f"annotation {_short(ann.get('id'))} has no valid bbox [x, y, w, h] (got {_short(bbox)})")
        )
        return
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        problems.append(Problem(where, f"box [{x}, {y}, {w}, {h}] has a non-finite value"))
        return
    width, height = img["width"], img["height"]
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
        if mask.shape != (height, width):
            problems.append(Problem(where, f"segmentation is {mask.shape[1]}x{mask.shape[0]}, not {width}x{height}"))
            return
        inside = np.zeros_like(mask)
        c0, r0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        inside[r0 : max(int(np.ceil(y + h)), 0), c0 : max(int(np.ceil(x + w)), 0)] = True
        outside = int((mask & ~inside).sum())
        if outside:
            problems.append(Problem(where, f"segmentation has {outside} pixel(s) outside the box"))
    elif img.get("distended") is True:
        problems.append(Problem(where, "distended image has no segmentation: pixel metrics will treat it as empty"))


def _image_problems(img: dict[str, Any], root: Path, where: str) -> list[str]:
    """Type and path problems of one image entry (all keys present)."""
    out = []
    if not _is_int(img["id"]):
        out.append(f"image id {_short(img['id'])} is not an integer")
    fn = img["file_name"]
    if not isinstance(fn, str) or not fn.strip():
        out.append(f"file_name {_short(fn)} is not a non-empty string")
    elif Path(fn).is_absolute():
        out.append(f"file_name {fn!r} is absolute; it must be relative to the dataset folder")
    else:
        root_r = root.resolve()
        try:
            target = (root / fn).resolve()
        except (OSError, RuntimeError) as exc:  # symlink loops
            out.append(f"file_name {fn!r} cannot be resolved ({exc})")
        else:
            if root_r not in target.parents:
                out.append(f"file_name {fn!r} resolves to {target}, outside the dataset folder")
    for key in ("width", "height"):
        if not _is_int(img[key]) or img[key] <= 0:
            out.append(f"{key} {_short(img[key])} is not a positive integer")
    pid = img["patient_id"]
    if not (isinstance(pid, str) and pid.strip()) and not _is_int(pid):
        out.append(f"patient_id {_short(pid)} is not a non-empty string or an integer")
    if not isinstance(img["distended"], bool):
        out.append(f"distended {_short(img['distended'])} is not a JSON boolean (true or false)")
    return out


def _check_splits(root: Path, images: dict[int, dict[str, Any]], problems: list[Problem]) -> None:
    path = root / "splits.json"
    if not path.is_file():
        return
    from scans.folds import check_folds, load_splits

    try:
        folds = load_splits(path)
    except ValueError as exc:
        problems.append(Problem(str(path), str(exc).removeprefix(f"{path}: ")))
        return
    scans = [
        Scan(i, root / img["file_name"], str(img["patient_id"]), int(img["distended"]), None, 1, 1)
        for i, img in images.items()
    ]
    problems.extend(Problem(str(path), p) for p in check_folds(folds, scans))


def check_dataset(root: Path | str, read_images: bool = True) -> list[Problem]:
    """All problems found in the dataset folder ``root``; an empty list means it is valid."""
    root = Path(root)
    ann_path = root / "annotations.json"
    doc, refused = _load_annotations(ann_path)
    if doc is None:
        return refused
    problems: list[Problem] = []
    if not isinstance(doc.get("images"), list):
        return [Problem(str(ann_path), "missing key 'images' (a list)")]
    if not isinstance(doc.get("annotations"), list):
        problems.append(Problem(str(ann_path), "missing key 'annotations' (a list)"))
    raw_cats = doc.get("categories", [])
    cats = [c for c in raw_cats if isinstance(c, dict)] if isinstance(raw_cats, list) else []
    recess_ids = {c.get("id") for c in cats if c.get("name") == CATEGORY and _is_int(c.get("id"))}
    if not recess_ids:
        problems.append(Problem(str(ann_path), f"no category named '{CATEGORY}' with an integer id"))

    id_counts = Counter(img.get("id") for img in doc["images"] if isinstance(img, dict) and _is_int(img.get("id")))
    images, by_file = _check_images(doc["images"], root, ann_path, id_counts, read_images, problems)
    annotations = doc["annotations"] if isinstance(doc.get("annotations"), list) else []
    per_image = _check_annotations(annotations, root, ann_path, recess_ids, images, id_counts, problems)
    for image_id, img in images.items():
        if per_image[image_id] == 0:
            problems.append(Problem(str(root / img["file_name"]), "image has no recess box"))
        elif per_image[image_id] > 1:
            problems.append(
                Problem(str(root / img["file_name"]), f"image has {per_image[image_id]} recess boxes; expected one")
            )
    problems.extend(_duplicate_files(root, by_file))
    _check_splits(root, images, problems)
    return problems


def _load_annotations(ann_path: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    """``annotations.json`` as a JSON object, or None and the one problem that stops the check."""
    if not ann_path.is_file():
        return None, [Problem(str(ann_path), "annotations.json not found")]
    try:
        doc = json.loads(ann_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        return None, [Problem(str(ann_path), f"invalid JSON ({exc})")]
    if not isinstance(doc, dict):
        return None, [
            Problem(
                str(ann_path),
                f"annotations.json must be a JSON object with 'images', 'annotations' and 'categories', "
                f"not {type(doc).__name__ if doc is not None else 'null'}",
            )
        ]
    return doc, []


def _check_images(
    entries: list[Any],
    root: Path,
    ann_path: Path,
    id_counts: Counter[Any],
    read_images: bool,
    problems: list[Problem],
) -> tuple[dict[int, dict[str, Any]], dict[Any, list[dict[str, Any]]]]:
    """The valid image entries by id, and by image file (its resolved path or inode); the problems of the
    others, and of images that cannot be read or whose size differs, go to ``problems``."""
    images: dict[int, dict[str, Any]] = {}
    by_file: dict[Any, list[dict[str, Any]]] = {}  # one image file (its resolved path or inode) -> its entries
    for n, img in enumerate(entries):
        if not isinstance(img, dict):
            problems.append(Problem(str(ann_path), f"images[{n}] is not an object"))
            continue
        fn = img.get("file_name")
        where = str(root / fn) if isinstance(fn, str) and fn.strip() else f"{ann_path} images[{n}]"
        missing = [k for k in REQUIRED_IMAGE_KEYS if k not in img]
        if missing:
            problems.append(Problem(where, f"image entry missing key(s) {', '.join(missing)}"))
            continue
        entry_problems = _image_problems(img, root, where)
        if entry_problems:
            problems.extend(Problem(where, p) for p in entry_problems)
            continue
        if id_counts[img["id"]] > 1:
            problems.append(Problem(where, f"duplicate image id {img['id']}"))
            continue
        images[img["id"]] = img
        by_file.setdefault(_file_key(root / img["file_name"]), []).append(img)
        if read_images:
            problems.extend(_read_problems(root, img, where))
    return images, by_file


def _read_problems(root: Path, img: dict[str, Any], where: str) -> list[Problem]:
    """Why the entry's image cannot be read, or the size it has when annotations.json says another."""
    try:
        arr = read_image(root / img["file_name"])
    except ReadError as exc:
        return [Problem(str(exc.path), exc.reason)]
    except Exception as exc:  # a decoder may raise anything on hostile bytes; check never raises
        return [Problem(where, f"cannot be read ({exc.__class__.__name__}: {exc})")]
    if arr.shape != (img["height"], img["width"]):
        return [
            Problem(
                where,
                f"image is {arr.shape[1]}x{arr.shape[0]} but annotations.json says {img['width']}x{img['height']}",
            )
        ]
    return []


def _check_annotations(
    annotations: list[Any],
    root: Path,
    ann_path: Path,
    recess_ids: set[Any],
    images: dict[int, dict[str, Any]],
    id_counts: Counter[Any],
    problems: list[Problem],
) -> Counter[int]:
    """The recess boxes per valid image; each annotation's problems go to ``problems``."""
    per_image: Counter[int] = Counter()
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann:
            problems.append(Problem(str(ann_path), f"annotations[{n}] {_short(ann)} has no image_id"))
            continue
        image_id = ann["image_id"]
        if not _is_int(image_id):
            problems.append(Problem(str(ann_path), f"annotations[{n}] image_id {_short(image_id)} is not an integer"))
            continue
        category = ann.get("category_id")
        if not _is_int(category):
            problems.append(
                Problem(str(ann_path), f"annotations[{n}] category_id {_short(category)} is not an integer")
            )
            continue
        if recess_ids and category not in recess_ids:
            continue
        img = images.get(image_id)
        if img is None:
            if image_id not in id_counts:
                problems.append(
                    Problem(str(ann_path), f"annotation {_short(ann.get('id'))} refers to unknown image {image_id}")
                )
            continue
        per_image[image_id] += 1
        _check_annotation(ann, img, str(root / img["file_name"]), problems)
    return per_image


def _file_key(path: Path) -> Any:
    """What makes two entries one image file: its inode (hard links, symlinks), else its resolved path."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(path.resolve()))


def _duplicate_files(root: Path, by_file: dict[Any, list[dict[str, Any]]]) -> list[Problem]:
    """One problem per image file listed more than once: a scan counted twice, and, under two patients,
    on both sides of a patient-grouped split."""
    out = []
    for entries in by_file.values():
        if len(entries) < 2:
            continue
        listed = ", ".join(
            f"image {_short(e['id'])} as {e['file_name']!r} (patient {e['patient_id']}, "
            f"{'distended' if e['distended'] is True else 'normal'})"
            for e in entries
        )
        reason = f"the same image file is listed {len(entries)} times in annotations.json: {listed}"
        patients = list(dict.fromkeys(str(e["patient_id"]) for e in entries))
        if len(patients) > 1:
            reason += f"; one file under {len(patients)} patients ({', '.join(patients)}) leaks across patient folds"
        if len({e["distended"] is True for e in entries}) > 1:
            reason += "; it is labelled both distended and normal"
        out.append(Problem(str(root / entries[0]["file_name"]), reason))
    return out


def summary_line(root: Path | str) -> str:
    doc = json.loads((Path(root) / "annotations.json").read_text())
    imgs = doc["images"]
    n_dist = sum(bool(i["distended"]) for i in imgs)
    n_pat = len({str(i["patient_id"]) for i in imgs})
    return f"{root}: OK, {len(imgs)} images ({n_dist} distended, {len(imgs) - n_dist} normal) from {n_pat} patients"
