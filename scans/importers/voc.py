"""Pascal VOC XML -> LoRIS.

Layout: ``Annotations/*.xml`` (one per image), images in ``JPEGImages/`` (or beside the XML, or
under the XML's ``<folder>``), and optionally ``ImageSets/Main/{train,val,test}.txt`` listing
image ids (file stems) per split. Each ``<object>`` has a ``<name>`` and a ``<bndbox>`` with
``xmin ymin xmax ymax`` as 1-based inclusive pixel indices, as in the VOC devkit, so the LoRIS box
is ``(xmin - 1, ymin - 1, xmax, ymax)``. VOC has no outlines: give masks with ``--masks``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from scans.check import Problem
from scans.importers.core import Source, SourceImage, out_name_for, split_name

_SPLIT_FILES = ("train", "val", "test")


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text else None


def _splits(src: Path, problems: list[Problem]) -> dict[str, str]:
    """Image stem -> split from ImageSets/Main/{train,val,test}.txt."""
    out: dict[str, str] = {}
    for name in _SPLIT_FILES:
        path = src / "ImageSets" / "Main" / f"{name}.txt"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            stem = line.split()[0] if line.split() else ""
            if not stem:
                continue
            if stem in out and out[stem] != name:
                problems.append(Problem(str(path), f"'{stem}' is in both {out[stem]} and {name}"))
            out[stem] = split_name(name) or name
    return out


def _image_path(src: Path, xml: Path, filename: str | None, folder: str | None) -> Path:
    stem_name = filename or xml.stem
    for base in (src / "JPEGImages", xml.parent, src / (folder or "JPEGImages"), src):
        if (base / stem_name).is_file():
            return base / stem_name
    if filename is None:
        for suffix in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"):
            cand = src / "JPEGImages" / f"{xml.stem}{suffix}"
            if cand.is_file():
                return cand
    return src / "JPEGImages" / stem_name


def read(src: Path) -> Source:
    """Read a VOC folder (see the module docstring)."""
    source = Source()
    ann_dir = src / "Annotations" if (src / "Annotations").is_dir() else src
    xmls = sorted(ann_dir.glob("*.xml")) if src.is_dir() else []
    if not xmls:
        source.problems.append(Problem(str(src), "no Annotations/*.xml found"))
        return source
    splits = _splits(src, source.problems)
    for xml in xmls:
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as exc:
            source.problems.append(Problem(str(xml), f"not readable XML ({exc})"))
            continue
        image = _image_path(src, xml, _text(root, "filename"), _text(root, "folder"))
        try:
            rel = image.relative_to(src)
        except ValueError:
            rel = Path(image.name)
        size = root.find("size")
        declared = None
        w, h = _text(size, "width"), _text(size, "height")
        if w and h and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0:
            declared = (int(w), int(h))
        split = splits.get(image.stem) if splits else None
        if splits and split is None:
            source.problems.append(Problem(str(image), "listed in no ImageSets/Main split file"))
        item = SourceImage(image, rel.as_posix(), out_name_for(rel), size=declared, split=split)
        source.images.append(item)
        for n, obj in enumerate(root.findall("object")):
            name = _text(obj, "name") or ""
            bb = obj.find("bndbox")
            try:
                x1, y1, x2, y2 = (float(_text(bb, k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError:
                x1 = y1 = x2 = y2 = float("nan")
            if not all(v == v for v in (x1, y1, x2, y2)):
                source.problems.append(Problem(str(xml), f"object {n} ({name}) has no numeric bndbox"))
                continue
            item.boxes.append((name, (x1 - 1, y1 - 1, x2, y2)))
    return source
