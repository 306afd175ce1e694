"""CVAT for images 1.1 XML -> LoRIS.

Layout: ``annotations.xml`` (or the XML file itself as SRC) and the images in ``images/`` (or
beside the XML). Each ``<image name width height [subset]>`` holds ``<box label xtl ytl xbr
ybr>`` and ``<polygon label points="x,y;x,y;...">`` in pixel coordinates. The ``subset``
attribute (Train/Validation/Test, as CVAT writes it) is the split.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from scans.check import Problem
from scans.importers.core import Source, SourceImage, out_name_for, split_name


def _find_image(base: Path, name: str, subset: str | None) -> Path:
    cands = [base / "images" / name, base / name]
    if subset:
        cands.insert(1, base / "images" / subset / name)
    return next((c for c in cands if c.is_file()), cands[0])


def read(src: Path) -> Source:
    """Read a CVAT for images 1.1 export (see the module docstring)."""
    source = Source()
    xml = src / "annotations.xml" if src.is_dir() else src
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as exc:
        source.problems.append(Problem(str(xml), f"not a readable CVAT XML ({exc})"))
        return source
    base = xml.parent
    for node in root.iter("image"):
        name = node.get("name")
        if not name:
            source.problems.append(Problem(str(xml), f"<image id={node.get('id')}> has no name"))
            continue
        subset = node.get("subset")
        image = _find_image(base, name, subset)
        rel = image.relative_to(base) if image.is_relative_to(base) else Path(name)
        w, h = node.get("width", ""), node.get("height", "")
        declared = (int(w), int(h)) if w.isdigit() and h.isdigit() else None
        split = split_name(subset) if subset else None
        if subset and split is None:
            source.problems.append(Problem(str(image), f"subset {subset!r} is not train, validation or test"))
        item = SourceImage(image, rel.as_posix(), out_name_for(rel), size=declared, split=split)
        source.images.append(item)
        for box in node.iter("box"):
            try:
                coords = tuple(float(box.get(k, "nan")) for k in ("xtl", "ytl", "xbr", "ybr"))
            except ValueError:
                coords = (float("nan"),) * 4
            if not all(v == v for v in coords):
                source.problems.append(Problem(str(xml), f"{name}: box ({box.get('label')}) without numeric corners"))
                continue
            item.boxes.append((box.get("label", ""), (coords[0], coords[1], coords[2], coords[3])))
        for poly in node.iter("polygon"):
            try:
                pts = [float(v) for pair in poly.get("points", "").split(";") for v in pair.split(",")]
            except ValueError:
                pts = []
            if len(pts) < 6 or len(pts) % 2:
                source.problems.append(Problem(str(xml), f"{name}: polygon ({poly.get('label')}) with invalid points"))
                continue
            item.polygons.append((poly.get("label", ""), pts))
    if not source.images and not source.problems:
        source.problems.append(Problem(str(xml), "no <image> elements (is this a CVAT for images 1.1 export?)"))
    return source
