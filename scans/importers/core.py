"""The shared core of every importer: what a converter returns, and the dataset writer.

A converter (one module per format) reads its source into a :class:`Source`: per image, the file,
its shapes in pixels (or normalised to [0, 1]), the declared size and the split. :func:`build`
then does what every format needs: reads each image's size, picks the label, keeps exactly one
box (a lone polygon gives its bounds), attaches the segmentation (polygons, or a mask PNG from
``--masks``), and resolves patient ids and the distended flag from ``--meta`` (CSV with columns
``file,patient,distended``) and ``--patient-pattern`` (a regex with a named group ``patient`` and
optionally ``distended``, searched in the file's base name). Every missing or ambiguous item is a
:class:`~scans.check.Problem` naming the source file, and any problem refuses the import.
:func:`write` builds the LoRIS dataset folder (README, "Your own data") in a temporary sibling of
``out``, runs :func:`scans.check.check_dataset` on it and renames it into place, so a refused or
killed import leaves nothing behind.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from scans.check import Problem, check_dataset
from scans.coco import encode_mask, save_coco
from scans.folds import Fold, save_splits
from scans.readers import ReadError, is_supported, read_image
from scans.records import Box, Scan

TRUE_WORDS = {"1", "true", "yes", "y", "distended", "d", "pos", "positive", "abnormal"}
FALSE_WORDS = {"0", "false", "no", "n", "normal", "neg", "negative"}
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class SourceImage:
    """One image as a converter found it.

    ``rel`` is the image's path relative to the source root (used to match ``--meta`` rows);
    ``out_name`` its path under ``images/`` in the new dataset. Boxes are ``(x1, y1, x2, y2)``
    and polygons flat ``[x1, y1, x2, y2, ...]``, in pixels, or in [0, 1] of the image size when
    ``normalized`` (YOLO). ``patient``/``distended`` are set by formats that carry them (CSV).
    """

    path: Path
    rel: str
    out_name: str
    boxes: list[tuple[str, Box]] = field(default_factory=list)
    polygons: list[tuple[str, list[float]]] = field(default_factory=list)
    size: tuple[int, int] | None = None
    split: str | None = None
    normalized: bool = False
    patient: str | None = None
    distended: str | bool | None = None
    mask: Path | None = None


@dataclass
class Source:
    """A converter's result: images, and the problems met while reading the source."""

    images: list[SourceImage] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    """Where patient ids, labels and masks come from (see the module docstring)."""

    meta: Path | None = None
    patient_pattern: str | None = None
    label: str | None = None
    masks: Path | None = None


@dataclass
class Planned:
    """One image ready to write."""

    source: SourceImage
    box: Box
    width: int
    height: int
    patient: str
    distended: bool
    segmentation: Any = None


class ImportRefused(Exception):
    """The import was refused; ``problems`` lists every reason, each with its file."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(f"import refused: {len(self.problems)} problem(s); nothing was written")


def parse_distended(value: Any) -> bool | None:
    """``True``/``False`` from a JSON boolean or a word like yes/no, 1/0, distended/normal; else None.

    >>> parse_distended("Yes"), parse_distended("0"), parse_distended(True), parse_distended("maybe")
    (True, False, True, None)
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def split_name(name: str) -> str | None:
    """``train``/``val``/``test`` for the usual subset names, else None."""
    return SPLIT_NAMES.get(name.strip().lower())


def compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--patient-pattern {pattern!r} is not a valid regular expression ({exc})") from exc
    if "patient" not in rx.groupindex:
        raise ValueError(f"--patient-pattern {pattern!r} needs a named group (?P<patient>...)")
    return rx


@dataclass
class _Meta:
    by_key: dict[str, dict[str, str]]
    problems: list[Problem]


def read_meta(path: Path) -> _Meta:
    """``--meta`` CSV rows keyed by their ``file`` column (a path relative to the source, or a base name)."""
    problems: list[Problem] = []
    rows: dict[str, dict[str, str]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "file" not in fields:
                return _Meta({}, [Problem(str(path), "meta CSV needs a header with a 'file' column")])
            if "patient" not in fields and "distended" not in fields:
                problems.append(Problem(str(path), "meta CSV has neither a 'patient' nor a 'distended' column"))
            for n, raw in enumerate(reader, start=2):
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
                key = row.get("file", "").replace("\\", "/").removeprefix("./")
                if not key:
                    problems.append(Problem(f"{path}:{n}", "row has an empty 'file'"))
                elif key in rows:
                    problems.append(Problem(f"{path}:{n}", f"'{key}' appears in more than one row"))
                else:
                    rows[key] = row
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return _Meta({}, [Problem(str(path), f"cannot read the meta CSV ({exc})")])
    return _Meta(rows, problems)


def _meta_row(meta: _Meta, img: SourceImage, basenames: Counter[str]) -> tuple[dict[str, str] | None, str | None]:
    for key in (img.rel, img.out_name):
        if key in meta.by_key:
            return meta.by_key[key], None
    base = Path(img.rel).name
    if base in meta.by_key:
        if basenames[base] > 1:
            return None, f"meta row '{base}' matches {basenames[base]} images; name it by its path in the source"
        return meta.by_key[base], None
    return None, None


def _find_mask(masks: Path, img: SourceImage) -> Path | None:
    stem = Path(img.out_name).with_suffix("")
    for cand in (masks / stem.with_suffix(".png"), masks / f"{Path(img.rel).stem}.png"):
        if cand.is_file():
            return cand
    return None


def _read_mask(path: Path, width: int, height: int) -> np.ndarray:
    arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise ValueError("not a decodable PNG")
    if arr.shape != (height, width):
        raise ValueError(f"mask is {arr.shape[1]}x{arr.shape[0]}, image is {width}x{height}")
    return arr > 0


def _polygon_box(poly: Sequence[float]) -> Box:
    xs, ys = poly[0::2], poly[1::2]
    return (float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys)))


def _fit_box(box: Box, width: int, height: int) -> Box | None:
    """The box clipped to the image when it leaves it by under a pixel (rounding); None when further."""
    x1, y1, x2, y2 = box
    if x1 < -1 or y1 < -1 or x2 > width + 1 or y2 > height + 1 or x2 <= x1 or y2 <= y1:
        return None
    return (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))


def _choose_label(source: Source, label: str | None) -> tuple[str | None, list[Problem]]:
    labels = Counter(name for img in source.images for name, _ in img.boxes + img.polygons)
    if label is not None:
        if label not in labels:
            known = ", ".join(sorted(labels)) or "none"
            return label, [Problem("--label", f"label '{label}' not found in the source (labels: {known})")]
        return label, []
    if len(labels) > 1:
        names = ", ".join(f"{k} ({v})" for k, v in sorted(labels.items()))
        return None, [
            Problem("--label", f"the source has several labels ({names}); choose the recess one with --label")
        ]
    return None, []


def build(source: Source, options: Options) -> list[Planned]:
    """Resolve every image of ``source`` into a :class:`Planned` one.

    Raises:
        ImportRefused: listing every problem, each with its file.
        ValueError: for an invalid ``--patient-pattern``.
    """
    rx = compile_pattern(options.patient_pattern)
    problems = list(source.problems)
    meta = read_meta(options.meta) if options.meta is not None else None
    if meta is not None:
        problems.extend(meta.problems)
    label, label_problems = _choose_label(source, options.label)
    if label_problems:  # every per-image count depends on the label: settle it first
        raise ImportRefused(problems + label_problems)
    if not source.images:
        problems.append(Problem("source", "no images found"))
    basenames = Counter(Path(img.rel).name for img in source.images)
    out_names = Counter(img.out_name for img in source.images)
    planned: list[Planned] = []
    for img in source.images:
        where = str(img.path)
        mine: list[str] = []
        if out_names[img.out_name] > 1:
            mine.append(f"{out_names[img.out_name]} source images would be written as images/{img.out_name}")
        size = _image_size(img, where, problems)
        if size is None:
            continue
        height, width = size
        if img.size is not None and tuple(img.size) != (width, height):
            mine.append(f"the annotation says {img.size[0]}x{img.size[1]} but the image is {width}x{height}")
        box, polys = _one_box(img, label, width, height, mine)
        segmentation = _segmentation(img, polys, options, width, height, mine)
        patient, distended = _identity(img, meta, rx, basenames, mine)
        if distended is True and not segmentation:
            mine.append(
                "distended image has no segmentation: give polygons, a mask column, or --masks DIR "
                "(mask PNGs named like the images)"
            )
        if mine or box is None or patient is None or distended is None:
            problems.extend(Problem(where, m) for m in mine)
            continue
        planned.append(Planned(img, box, width, height, patient, distended, segmentation))
    if problems:
        raise ImportRefused(problems)
    return planned


def _image_size(img: SourceImage, where: str, problems: list[Problem]) -> tuple[int, int] | None:
    """``(height, width)`` of ``img``'s file, or None once the reason it cannot be read is in ``problems``."""
    if not img.path.is_file():
        problems.append(Problem(where, "image file not found"))
        return None
    if not is_supported(img.path):
        problems.append(Problem(where, f"unsupported image type '{img.path.suffix}'"))
        return None
    try:
        height, width = read_image(img.path).shape
    except ReadError as exc:
        problems.append(Problem(where, exc.reason))
        return None
    return height, width


def _one_box(
    img: SourceImage, label: str | None, width: int, height: int, mine: list[str]
) -> tuple[Box | None, list[list[float]]]:
    """:func:`build`'s box of ``img`` (its one box of ``label``, or its one polygon's box) fitted to the image,
    and its polygons of ``label`` in pixels; what is wrong goes to ``mine``."""
    sx, sy = (width, height) if img.normalized else (1, 1)
    boxes = [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for name, b in img.boxes if label in (None, name)]
    polys = [
        [v * (sx if i % 2 == 0 else sy) for i, v in enumerate(p)] for name, p in img.polygons if label in (None, name)
    ]
    if not boxes and len(polys) == 1:
        boxes = [_polygon_box(polys[0])]
    box: Box | None = None
    if not boxes:
        mine.append("no box" + (f" labelled '{label}'" if label else "") + "; LoRIS needs one recess box per image")
    elif len(boxes) > 1:
        mine.append(f"{len(boxes)} boxes" + (f" labelled '{label}'" if label else "") + "; LoRIS needs exactly one")
    else:
        box = _fit_box(boxes[0], width, height)
        if box is None:
            mine.append(f"box {tuple(round(v, 2) for v in boxes[0])} lies outside the {width}x{height} image")
    return box, polys


def _segmentation(
    img: SourceImage, polys: list[list[float]], options: Options, width: int, height: int, mine: list[str]
) -> Any:
    """:func:`build`'s segmentation of ``img``: its polygons (6+ values), else its mask as RLE, else None."""
    segmentation: Any = [p for p in polys if len(p) >= 6] or None
    mask_path = img.mask or (_find_mask(options.masks, img) if options.masks is not None else None)
    if mask_path is not None:
        if segmentation:
            mine.append(f"both polygons and a mask ({mask_path}); keep one")
        else:
            try:
                segmentation = encode_mask(_read_mask(mask_path, width, height))
            except (OSError, ValueError) as exc:
                mine.append(f"mask {mask_path}: {exc}")
    return segmentation


def _identity(
    img: SourceImage, meta: _Meta | None, rx: re.Pattern[str] | None, basenames: Counter[str], mine: list[str]
) -> tuple[str | None, bool | None]:
    """Patient id and distended flag from the source, ``--meta`` and ``--patient-pattern``; conflicts are problems."""
    patients: dict[str, str] = {}
    flags: dict[str, str | bool] = {}
    if img.patient:
        patients["source"] = img.patient
    if img.distended is not None and img.distended != "":
        flags["source"] = img.distended
    if meta is not None:
        row, why = _meta_row(meta, img, basenames)
        if why:
            mine.append(why)
        if row is not None:
            if row.get("patient"):
                patients["--meta"] = row["patient"]
            if row.get("distended"):
                flags["--meta"] = row["distended"]
    if rx is not None:
        m = rx.search(Path(img.rel).name)
        if m is not None:
            if m.group("patient"):
                patients["--patient-pattern"] = m.group("patient")
            if "distended" in rx.groupindex and m.group("distended"):
                flags["--patient-pattern"] = m.group("distended")
    patient = None
    if not patients:
        mine.append("no patient id (give --meta FILE or --patient-pattern REGEX)")
    elif len(set(patients.values())) > 1:
        mine.append("conflicting patient ids: " + ", ".join(f"{v!r} from {k}" for k, v in patients.items()))
    else:
        patient = next(iter(patients.values()))
    distended = None
    parsed = {k: parse_distended(v) for k, v in flags.items()}
    bad = [f"{flags[k]!r} from {k}" for k, v in parsed.items() if v is None]
    if not flags:
        mine.append("no distended flag (a 'distended' column in --meta, or a (?P<distended>...) group)")
    elif bad:
        mine.append("distended flag not understood: " + ", ".join(bad) + " (use true/false, yes/no, 1/0)")
    elif len(set(parsed.values())) > 1:
        mine.append("conflicting distended flags: " + ", ".join(f"{flags[k]!r} from {k}" for k in flags))
    else:
        distended = next(iter(parsed.values()))
    return patient, distended


def _splits(planned: Sequence[Planned], ids: Sequence[int]) -> tuple[list[Fold] | None, list[Problem]]:
    given = [p.source.split for p in planned]
    if all(s is None for s in given):
        return None, []
    parts: dict[str, list[int]] = defaultdict(list)
    problems = []
    for p, i in zip(planned, ids):
        if p.source.split is None:
            problems.append(Problem(str(p.source.path), "in no split while others are (train/val/test)"))
        else:
            parts[p.source.split].append(i)
    return [Fold(tuple(parts["train"]), tuple(parts["val"]), tuple(parts["test"]))], problems


@contextmanager
def building_folder(out: Path, label: str) -> Iterator[Path]:
    """A fresh hidden sibling folder of ``out`` to build a dataset in, renamed to ``out`` (which must be
    missing or empty) when the block ends, and removed when it raises, so a killed run leaves no half folder.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "ds"
    >>> with building_folder(out, "demo") as tmp:
    ...     _ = (tmp / "a.txt").write_text("x")
    >>> sorted(p.name for p in out.iterdir()), sorted(p.name for p in out.parent.iterdir())
    (['a.txt'], ['ds'])
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{label}-"))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty: replace it
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write(planned: Sequence[Planned], out: Path | str) -> Path:
    """Write the dataset folder ``out`` atomically (see the module docstring).

    Raises:
        ImportRefused: when ``out`` is a non-empty folder or a file, or the written dataset fails
            :func:`scans.check.check_dataset` (problems name the source files).
    """
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ImportRefused([Problem(str(out), "already exists and is not an empty folder; choose a new --out")])
    with building_folder(out, "importing") as tmp:
        order = sorted(planned, key=lambda p: p.source.out_name)
        scans, back = [], {}
        for i, p in enumerate(order, start=1):
            dest = tmp / "images" / p.source.out_name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p.source.path, dest)
            back[str(dest)] = str(p.source.path)
            scans.append(Scan(i, dest, p.patient, int(p.distended), p.box, p.width, p.height, p.segmentation))
        save_coco(tmp / "annotations.json", scans, tmp)
        folds, problems = _splits(order, [s.id for s in scans])
        if folds is not None:
            save_splits(tmp / "splits.json", folds)
        problems += [
            Problem(back.get(q.file, q.file.replace(str(tmp), str(out))), q.reason)
            for q in check_dataset(tmp, read_images=False)
        ]
        if problems:
            raise ImportRefused(problems)
    return out


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (by suffix), sorted, hidden folders skipped."""
    from scans.readers import SUPPORTED_SUFFIXES

    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def out_name_for(rel: Path) -> str:
    """The name under ``images/`` for a source-relative path: a leading image-folder name is dropped.

    >>> out_name_for(Path("images/train/a.png")), out_name_for(Path("JPEGImages/b.jpg")), out_name_for(Path("c.png"))
    ('train/a.png', 'b.jpg', 'c.png')
    """
    parts = rel.parts
    if len(parts) > 1 and parts[0].lower() in ("images", "jpegimages", "img", "imgs"):
        parts = parts[1:]
    return Path(*parts).as_posix()
