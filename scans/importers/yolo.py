"""YOLO (Ultralytics / Darknet) text labels -> LoRIS.

Layout: image files under a folder named ``images`` (e.g. ``images/train/a.png``), each with a
label file at the same path under ``labels`` with suffix ``.txt`` (Ultralytics' rule). A line is
``class cx cy w h`` (a box) or ``class x1 y1 x2 y2 ...`` (a YOLO-seg polygon), normalised to
[0, 1]. Class names come from ``data.yaml``/``dataset.yaml`` (``names``: a list or a dict),
``classes.txt`` or ``obj.names``, else the class number. A ``train``/``val``/``valid``/``test``
folder in an image's path is its split. An image without a label file is reported (LoRIS needs
one box per image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from scans.check import Problem
from scans.importers.core import Source, SourceImage, list_images, out_name_for, split_name


def _names(src: Path, problems: list[Problem]) -> dict[int, str]:
    for name in ("data.yaml", "dataset.yaml", "data.yml"):
        path = src / name
        if path.is_file():
            try:
                doc: Any = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as exc:
                problems.append(Problem(str(path), f"cannot read ({exc})"))
                return {}
            names = doc.get("names") if isinstance(doc, dict) else None
            if isinstance(names, list):
                return {i: str(n) for i, n in enumerate(names)}
            if isinstance(names, dict):
                return {int(k): str(v) for k, v in names.items() if str(k).isdigit()}
            problems.append(Problem(str(path), "no 'names' list or mapping"))
            return {}
    for name in ("classes.txt", "obj.names"):
        path = src / name
        if path.is_file():
            return {i: n.strip() for i, n in enumerate(path.read_text().splitlines()) if n.strip()}
    return {}


def _label_path(src: Path, image: Path) -> Path:
    parts = list(image.relative_to(src).parts)
    idx = max(i for i, p in enumerate(parts) if p == "images")
    parts[idx] = "labels"
    return (src / Path(*parts)).with_suffix(".txt")


def read(src: Path) -> Source:
    """Read a YOLO folder (see the module docstring)."""
    source = Source()
    if not src.is_dir():
        source.problems.append(Problem(str(src), "a YOLO source is a folder with images/ and labels/"))
        return source
    names = _names(src, source.problems)
    for image in list_images(src):
        rel = image.relative_to(src)
        if "images" not in rel.parts[:-1]:
            continue  # YOLO images live under an images/ folder; others (e.g. masks) are not part of it
        split = next((s for s in (split_name(p) for p in rel.parts[:-1]) if s), None)
        item = SourceImage(image, rel.as_posix(), out_name_for(rel), split=split, normalized=True)
        source.images.append(item)
        label_file = _label_path(src, image)
        if not label_file.is_file():
            source.problems.append(Problem(str(image), f"no label file {label_file}"))
            continue
        for n, line in enumerate(label_file.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                cls = int(fields[0])
                values = [float(v) for v in fields[1:]]
            except ValueError:
                source.problems.append(Problem(f"{label_file}:{n}", f"not numbers: {line.strip()!r:.60}"))
                continue
            name = names.get(cls, str(cls))
            if len(values) == 4:
                cx, cy, w, h = values
                item.boxes.append((name, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
            elif len(values) >= 6 and len(values) % 2 == 0:
                item.polygons.append((name, values))
            else:
                source.problems.append(
                    Problem(f"{label_file}:{n}", f"expected 'class cx cy w h' or a polygon, got {len(values)} values")
                )
    return source
