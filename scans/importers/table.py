"""A spreadsheet (CSV) of boxes -> LoRIS (registered as ``csv``).

SRC is a CSV file with a header. Required: ``file`` (relative to the CSV's folder) and a box as
``x1,y1,x2,y2`` or as ``x,y,w,h`` (pixels). Optional: ``patient``, ``distended``, ``split``
(train/val/test), ``label`` (when several kinds of box are listed) and ``mask`` (a mask PNG,
relative to the CSV's folder). One row per box; a file listed on several rows has several boxes.
"""

from __future__ import annotations

import csv
from pathlib import Path

from scans.check import Problem
from scans.importers.core import Source, SourceImage, out_name_for, split_name


def _box(row: dict[str, str], corners: bool) -> tuple[float, ...] | None:
    """A row's box as ``x1, y1, x2, y2`` from its corners or from ``x, y, w, h``; None when not numbers."""
    try:
        if corners:
            return tuple(float(row[k]) for k in ("x1", "y1", "x2", "y2"))
        x, y = float(row["x"]), float(row["y"])
        w, h = float(row.get("w") or row["width"]), float(row.get("h") or row["height"])
        return (x, y, x + w, y + h)
    except (KeyError, ValueError):
        return None


def read(src: Path) -> Source:
    """Read a CSV of boxes (see the module docstring)."""
    source = Source()
    base = src.parent
    try:
        with open(src, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = {(f or "").strip().lower() for f in reader.fieldnames or []}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        source.problems.append(Problem(str(src), f"cannot read the CSV ({exc})"))
        return source
    corners = {"x1", "y1", "x2", "y2"} <= fields
    xywh = {"x", "y", "w", "h"} <= fields or {"x", "y", "width", "height"} <= fields
    if "file" not in fields or not (corners or xywh):
        source.problems.append(Problem(str(src), "needs columns file and x1,y1,x2,y2 (or x,y,w,h)"))
        return source
    images: dict[str, SourceImage] = {}
    for n, raw in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
        where = f"{src}:{n}"
        rel = Path(row.get("file", "").replace("\\", "/"))
        if not row.get("file") or rel.is_absolute() or ".." in rel.parts:
            source.problems.append(Problem(where, f"file {row.get('file')!r} must be a path relative to the CSV"))
            continue
        box = _box(row, corners)
        if box is None:
            source.problems.append(Problem(where, "box values are not numbers"))
            continue
        key = rel.as_posix()
        item = images.get(key)
        split = split_name(row["split"]) if row.get("split") else None
        if row.get("split") and split is None:
            source.problems.append(Problem(where, f"split {row['split']!r} is not train, val or test"))
        if item is None:
            item = SourceImage(base / rel, key, out_name_for(rel), split=split)
            item.patient = row.get("patient") or None
            item.distended = row.get("distended") or None
            item.mask = base / row["mask"] if row.get("mask") else None
            images[key] = item
            source.images.append(item)
        else:
            for col, old in (("patient", item.patient), ("distended", item.distended), ("split", item.split)):
                new = split if col == "split" else (row.get(col) or None)
                if new != old:
                    source.problems.append(Problem(where, f"{col} {new!r} differs from {old!r} on an earlier row"))
        item.boxes.append((row.get("label", ""), (box[0], box[1], box[2], box[3])))
    return source
