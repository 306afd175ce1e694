"""LabelMe JSON -> LoRIS.

Layout: one ``*.json`` per image anywhere under the source folder, with ``imagePath`` (relative
to the JSON file), ``imageWidth``, ``imageHeight`` and ``shapes``: each a ``label``, a
``shape_type`` (``rectangle`` gives the box from its two corners, ``polygon`` the outline) and
``points`` in pixel coordinates. A ``train``/``val``/``test`` folder in the JSON's path is its
split. Images embedded only as ``imageData`` are not imported: keep the image files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scans.check import Problem
from scans.importers.core import Source, SourceImage, out_name_for, split_name


def _points(shape: dict[str, Any]) -> list[tuple[float, float]]:
    pts = shape.get("points")
    if not isinstance(pts, list):
        raise ValueError("no points")
    return [(float(p[0]), float(p[1])) for p in pts]


def read(src: Path) -> Source:
    """Read a folder of LabelMe JSON files (see the module docstring)."""
    source = Source()
    files = sorted(p for p in src.rglob("*.json") if not any(s.startswith(".") for s in p.relative_to(src).parts))
    if not files:
        source.problems.append(Problem(str(src), "no LabelMe *.json files found"))
        return source
    for path in files:
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            source.problems.append(Problem(str(path), f"not readable JSON ({exc})"))
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("imagePath"), str) or "shapes" not in doc:
            continue  # not a LabelMe file (e.g. a stray config)
        image = (path.parent / doc["imagePath"].replace("\\", "/")).resolve()
        try:
            rel = image.relative_to(src.resolve())
        except ValueError:
            source.problems.append(Problem(str(path), f"imagePath {doc['imagePath']!r} lies outside the source folder"))
            continue
        w, h = doc.get("imageWidth"), doc.get("imageHeight")
        declared = (w, h) if isinstance(w, int) and isinstance(h, int) else None
        split = next((s for s in (split_name(p) for p in rel.parts[:-1]) if s), None)
        item = SourceImage(image, rel.as_posix(), out_name_for(rel), size=declared, split=split)
        source.images.append(item)
        for n, shape in enumerate(doc["shapes"] if isinstance(doc["shapes"], list) else []):
            if not isinstance(shape, dict):
                continue
            label, kind = str(shape.get("label", "")), shape.get("shape_type") or "polygon"
            try:
                pts = _points(shape)
            except (TypeError, ValueError, IndexError):
                source.problems.append(Problem(str(path), f"shape {n} ({label}) has invalid points"))
                continue
            if kind == "rectangle" and len(pts) == 2:
                (xa, ya), (xb, yb) = pts
                item.boxes.append((label, (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))))
            elif kind == "polygon" and len(pts) >= 3:
                item.polygons.append((label, [v for p in pts for v in p]))
            else:
                source.problems.append(Problem(str(path), f"shape {n} ({label}): {kind} with {len(pts)} points"))
    return source
