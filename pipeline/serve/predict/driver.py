"""Batch processing of a new scan folder with a trained bundle (``python -m pipeline predict``).

Every image is read with :func:`scans.readers.read_scan`: DICOMs are cropped to their B-mode
ultrasound region (``crop="regions"``, the default, acts only when a file has one; ``"auto"``
also finds the region from the pixels; ``"none"`` never crops), the model runs on the crop, and
the box and mask are mapped back to the scan's own pixels. Cine files give one frame
(``frames="first"``, a frame number) or one row per frame (``"all"``).

It writes ``predictions.csv`` (keyed by file path and frame, with the SOP Instance UID, the image
``score``, its calibrated ``probability`` of distension (the bundle's ``calibration``, fitted on its
validation part; empty for a bundle without one), the ``verdict`` (``score`` against ``threshold``),
the crop and the mask as a COCO compressed RLE string in ``mask_rle``, in the scan's own pixels, read
back with :func:`decode_mask`; no mask images are written; ``orientation``, the EXIF Orientation a JPEG's
pixels were turned by before anything else, 1 when none), ``errors.csv``, ``predict.json`` (the
bundle and shard that made the folder) and the review page (:mod:`pipeline.serve.review`);
``overlays=True`` adds ``overlays/<name>.png`` (else the ``overlay`` column is empty), and
``dicom_out`` SEG/SR/SC objects under ``dicom/`` (:mod:`pipeline.serve.dicom_out`). No patient tag
reaches the CSV, PNG or HTML outputs (docs/design.md, "Outputs for clinicians and PACS").

Archive scale: frames are decoded by ``workers`` DataLoader processes while the model runs;
``shard=(k, n)`` keeps the files whose path hash is ``k`` modulo ``n`` (:func:`shard_of`), so
``n`` runs share an archive, and :func:`merge_outputs` (``python -m pipeline merge``) joins
their folders into one.

One bad file never stops the batch: unsupported, unreadable or corrupt files, symbolic-link
loops, broken links, special files and images over ``max_pixels`` (checked from the header,
before decoding) go to ``errors.csv`` with the reason. Rows are appended and flushed per batch,
images are written atomically, and a rerun skips what ``predictions.csv`` and ``errors.csv``
already hold. The output folder is locked while a process writes it (:func:`output_lock`), and a rerun
with another bundle, shard or setting is refused (:func:`check_resume`).

File names in the CSVs (:func:`csv_name`, undone by :func:`decode_name`): a name that is not valid
UTF-8 or that holds a backslash is written escaped (``\\\\`` for a backslash, ``\\xNN`` for each byte
that is not UTF-8), and a cell that a spreadsheet would run as a formula (one starting with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return), or that starts with ``'``, gets a ``'`` in front
(OWASP's advice for CSV injection): strip one leading ``'`` to get the text back.

>>> parse_frames("all"), parse_frames("3"), parse_frames(None)
('all', 3, None)
>>> parse_shard("1/4"), shard_of("a/b.png", 1)
((1, 4), 0)
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import importlib
import io
import json
import locale
import os
import re
import shutil
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.serve.bundle import Bundle, BundleOutput
from runtime.io import atomic_write_text, confined, write_png
from runtime.timing import Stopwatch
from scans.coco import decode_segmentation, encode_mask
from scans.readers import (
    CROP_MODES,
    TIFF_SUFFIXES,
    Crop,
    CropMode,
    ReadError,
    ReadResult,
    frame_indices,
    is_dicom,
    is_supported,
    read_scan,
    resize_image,
    resize_mask,
)

DEFAULT_MAX_PIXELS = 50_000_000  # per frame; an 8-bit 50 MP image already takes ~1 GB once converted to float
CROP_FIELDS = ["crop_x0", "crop_y0", "crop_x1", "crop_y1", "crop_source"]
PRED_FIELDS = [
    "file",
    "frame",
    "sop_instance_uid",
    "score",
    "probability",
    "verdict",
    "threshold",
    "box_x1",
    "box_y1",
    "box_x2",
    "box_y2",
    "box_source",
    "box_confidence",
    "mask_rle",
    "overlay",
    "width",
    "height",
    *CROP_FIELDS,
    "dicom",
    "orientation",  # the EXIF Orientation applied to the stored pixels before anything else (1: none)
]
ERR_FIELDS = ["file", "frame", "sop_instance_uid", "reason"]
FrameSpec = str | int | None
Shard = tuple[int, int]  # (k, n): the k-th of n parts of a folder


def parse_frames(value: str | int | None) -> FrameSpec:
    """``None`` (the bundle's frame), ``"first"``, ``"all"`` or a frame number >= 0; anything else raises ValueError."""
    if value is None:
        return None
    spec = str(value).strip().lower()
    if spec in ("first", "all"):
        return spec
    try:
        n = int(spec)
    except ValueError:
        raise ValueError(f"frames must be 'first', 'all' or a frame number, not {value!r}") from None
    if n < 0:
        raise ValueError(f"frames: a frame number is 0 or more, not {n}")
    return n


def parse_shard(value: str) -> Shard:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``; anything else raises ValueError."""
    k_text, _, n_text = str(value).strip().partition("/")
    try:
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"shard must be K/N, e.g. 0/4, not {value!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"shard {value}: K/N needs 0 <= K < N")
    return k, n


def shard_of(rel: str, n: int) -> int:
    """The shard (0 to ``n - 1``) of a file: the SHA-256 of its path relative to the input folder, modulo
    ``n``, the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(os.fsencode(rel)).digest()[:8], "big") % n


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula (OWASP)
_ESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def safe_cell(text: str) -> str:
    """``text`` as a CSV cell that a spreadsheet shows as text and never runs: a cell starting with
    ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (OWASP, "CSV Injection"), or with ``'``,
    gets a ``'`` in front, so stripping one leading ``'`` from a cell that has one gives the text
    back. Characters no text file can hold (lone surrogates) are written as ``\\udcNN``.

    >>> safe_cell("=1+1"), safe_cell("'a"), safe_cell("a=b"), safe_cell("-x")
    ("'=1+1", "''a", 'a=b', "'-x")
    """
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "'" + text if text.startswith((*FORMULA_START, "'")) else text


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8: os.fsdecode gave surrogates
        return False
    return True


def csv_name(rel: str) -> str:
    """The ``file`` cell of a path relative to the input folder; :func:`decode_name` undoes it.

    A name that is valid UTF-8 and holds no backslash is written as it is; any other is escaped: a
    backslash as ``\\\\`` and each byte that is not UTF-8 as ``\\xNN``. Then :func:`safe_cell`
    (a ``'`` in front of a cell a spreadsheet would run). No two paths give one cell.

    >>> csv_name("a/b.png"), csv_name("=x.png"), csv_name(os.fsdecode(b"bad\\xff.png")), csv_name("a\\\\b")
    ('a/b.png', "'=x.png", 'bad\\\\xff.png', 'a\\\\\\\\b')
    """
    if "\\" in rel or not _is_utf8(rel):
        raw = rel.replace("\\", "\\\\").encode(sys.getfilesystemencoding(), "surrogateescape")
        rel = raw.decode("utf-8", "backslashreplace")
    return safe_cell(rel)


def decode_name(cell: str) -> str:
    """The path relative to the input folder that :func:`csv_name` wrote as the ``file`` cell ``cell``
    (a ``str`` that :mod:`os` and :class:`~pathlib.Path` take; for a name that is not UTF-8 it holds
    the bytes as surrogates, as :func:`os.fsdecode` gives them).

    >>> [decode_name(csv_name(n)) for n in ("a.png", "'=x", "-1", "a\\\\xff")]
    ['a.png', "'=x", '-1', 'a\\\\xff']
    >>> os.fsencode(decode_name("bad\\\\xff.png"))
    b'bad\\xff.png'
    """
    name = cell[1:] if cell.startswith("'") else cell
    if "\\" not in name:
        return name
    raw, pos = bytearray(), 0
    for m in _ESCAPE.finditer(name):
        raw += name[pos : m.start()].encode("utf-8")
        raw += b"\\" if m[1] == "\\" else bytes([int(m[1][1:], 16)])
        pos = m.end()
    raw += name[pos:].encode("utf-8")
    return os.fsdecode(bytes(raw))


def check_paths(folder: Path, out: Path) -> None:
    """Refuse an output folder equal to, inside or around the input folder (the outputs would become inputs)."""
    f, o = Path(folder).resolve(), Path(out).resolve()
    if o == f:
        raise ValueError(f"--out {out} is the input folder: choose an output folder outside {folder}")
    if f in o.parents:
        raise ValueError(f"--out {out} is inside the input folder {folder}: choose an output folder outside it")
    if o in f.parents:
        raise ValueError(f"--out {out} contains the input folder {folder}: choose an output folder outside it")


def _entry_problem(path: Path) -> str | None:
    """Why a listed entry cannot be read as a file (None for a regular file); follows symbolic links."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.ENOENT and path.is_symlink():
            return "broken symbolic link (its target does not exist)"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return ""  # a directory: not an input file, not an error
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, pipe or socket)"
    return None


def list_inputs(folder: Path, recursive: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The regular files of ``folder`` (sorted) and the entries that cannot be read, with the reason.

    Directory links are not followed, so a directory loop cannot recurse forever.
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []

    def unreadable_dir(exc: OSError) -> None:
        problems.append((Path(exc.filename), f"folder cannot be listed ({exc.strerror or exc})"))

    if recursive:
        walk = os.walk(folder, onerror=unreadable_dir, followlinks=False)
        names = [Path(root) / n for root, dirs, fnames in walk for n in fnames]
    else:
        try:
            names = [Path(e.path) for e in os.scandir(folder)]
        except OSError as exc:
            raise FileNotFoundError(f"{folder}: input folder cannot be listed ({exc.strerror or exc})") from None
    for p in names:
        problem = _entry_problem(p)
        if problem is None:
            files.append(p)
        elif problem:
            problems.append((p, problem))
    return sorted(files), sorted(problems)


def header_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header without decoding pixels; None when unknown.

    Raises:
        ReadError: for a DICOM header that cannot be read, a permission error, or an image
            Pillow refuses as a decompression bomb.
    """
    if is_dicom(path):
        from scans.dicom import open_dicom

        ds = open_dicom(path, pixels=False)
        try:
            return int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
        except (TypeError, ValueError):
            return None
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return int(im.size[0]), int(im.size[1])
        except Image.DecompressionBombError as exc:
            raise ReadError(path, f"image too large to open ({exc})") from None
        except UnidentifiedImageError:
            return None  # a format Pillow lacks (or a corrupt file): the reader decides
        except OSError as exc:
            if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError):
                raise ReadError(path, f"cannot be read ({exc.strerror or exc})") from None
            return None
        except Exception:  # Pillow raises SyntaxError, ValueError... on damaged headers: the reader decides
            return None


def check_size(path: Path, max_pixels: int) -> None:
    """Refuse an image whose header says it has more than ``max_pixels`` pixels per frame."""
    size = header_size(path)
    if size and size[0] * size[1] > max_pixels:
        w, h = size
        raise ReadError(
            path,
            f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:g} "
            f"(raise it with --max-megapixels)",
        )


def _stem(folder: Path, path: Path, frame: int | None = None) -> str:
    """A flat, unique output name for an input file (and frame), safe inside the output folder."""
    rel = path.relative_to(folder).as_posix()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in rel.replace("/", "__"))
    digest = hashlib.sha1(os.fsencode(rel)).hexdigest()[:6]  # the name's bytes, UTF-8 or not
    return f"{safe[:100]}-{digest}" + (f"-f{frame}" if frame is not None else "")


def _drop_torn_tail(path: Path) -> None:
    """A kill during an append can leave half a row: cut the file back to its last newline."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _read_rows(path: Path, fields: list[str]) -> list[dict[str, str]]:
    """The rows of an output CSV from an earlier run, less a half row a killed run left at its end;
    refuses a file that is not text, not CSV or has other columns, naming it."""
    if not path.is_file() or path.stat().st_size == 0:
        return []
    data = path.read_bytes()
    end = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
    encoding = locale.getpreferredencoding(False)
    try:
        reader = csv.DictReader(io.StringIO(data[:end].decode(encoding), newline=""))
        header, rows = reader.fieldnames, list(reader)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not a LoRIS {path.name}: byte {exc.start} (0x{data[exc.start]:02x}) is not {encoding} text; "
            "choose a new --out, or move that file away"
        ) from None
    except csv.Error as exc:
        raise ValueError(
            f"{path} is not a LoRIS {path.name} ({exc}): choose a new --out, or move that file away"
        ) from None
    if header != fields:
        raise ValueError(
            f"{path} is not a LoRIS {path.name} of this version (its columns: {', '.join(header or [])[:200]}): "
            "choose a new --out"
        )
    return rows


class _CsvAppender:
    """Appends CSV rows, each batch as one write that is flushed and synced, or undone when it fails."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        new = not path.is_file() or path.stat().st_size == 0
        self.fields = fields
        self.fh = open(path, "ab", buffering=0)
        if new:
            self._append([dict(zip(fields, fields))])

    def _append(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO()
        csv.DictWriter(text, fieldnames=self.fields).writerows(rows)
        data = memoryview(text.getvalue().encode(locale.getpreferredencoding(False)))
        fd = self.fh.fileno()
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[self.fh.write(data) :]
            os.fsync(fd)  # a killed run keeps every row written so far
        except OSError:
            os.ftruncate(fd, start)  # a failed append (a full disk) leaves no half row behind
            raise

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._append(rows)

    def close(self) -> None:
        self.fh.close()


def overlay(
    image: np.ndarray,
    box: tuple[float, float, float, float],
    mask: np.ndarray,
    heat: np.ndarray,
    region: Crop | None = None,
) -> np.ndarray:
    """BGR uint8: the scan, a heat map of the anomaly map, the mask contour and the box.

    ``heat`` covers ``region`` (``(x0, y0, x1, y1)`` of ``image``, the crop the model saw) or, when
    it is None, the whole image; outside the region the scan is shown as is.
    """
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    out = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    x0, y0, x1, y1 = region if region is not None else (0, 0, gray.shape[1], gray.shape[0])
    h = heat.astype(np.float32)
    span = float(h.max() - h.min())
    h8 = ((h - h.min()) / span * 255).astype(np.uint8) if span > 0 else np.zeros(h.shape, np.uint8)
    colored = cv2.applyColorMap(h8, cv2.COLORMAP_JET)
    out[y0:y1, x0:x1] = cv2.addWeighted(out[y0:y1, x0:x1], 0.65, colored, 0.35, 0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 255, 255), 1)
    bx1, by1, bx2, by2 = (int(round(v)) for v in box)
    cv2.rectangle(out, (bx1, by1), (bx2 - 1, by2 - 1), (0, 255, 0), 1)
    return out


@dataclass(frozen=True)
class _Item:
    """One frame of one input file to process."""

    path: Path
    rel: str
    frame: int


@dataclass
class _Batch:
    """The frames read for one batch (cropped reads and model-size copies) and the rows of the others."""

    items: list[_Item] = field(default_factory=list)
    reads: list[ReadResult] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, got: _Frame | dict[str, Any]) -> None:
        if isinstance(got, _Frame):
            self.items.append(got.item)
            self.reads.append(got.read)
            self.images.append(got.image)
        else:
            self.errors.append(got)

    def __len__(self) -> int:
        return len(self.items) + len(self.errors)


def _error(rel: str, reason: str, frame: int | str = "", uid: str | None = None) -> dict[str, Any]:
    """An ``errors.csv`` row; ``rel`` is the path relative to the input folder (see :func:`csv_name`)."""
    return {
        "file": csv_name(rel),
        "frame": frame,
        "sop_instance_uid": safe_cell(uid or ""),
        "reason": safe_cell(reason),
    }


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, ReadError) else f"{exc.__class__.__name__}: {exc}"


@dataclass(frozen=True)
class ReadOptions:
    """How ``predict`` reads scans: crop mode, ultrasound region, frames and the pixel limit."""

    crop: CropMode = "regions"
    region: int | None = None
    frames: FrameSpec = None
    max_pixels: int = DEFAULT_MAX_PIXELS


def _frames(path: Path, frames: FrameSpec, default_frame: int) -> list[int]:
    """The frames of ``path`` to process; ``None`` is the bundle's frame (always 0 for raster images)."""
    if frames is None:
        return [default_frame] if default_frame and is_dicom(path) else [0]
    return frame_indices(path, frames)


def _known_frame(path: Path, frames: FrameSpec, default_frame: int) -> int | None:
    """The one frame ``frames`` selects in ``path`` when it is known without reading the header; None
    for ``"all"`` of a file that may hold several (a DICOM or a TIFF), so a resume checks each frame."""
    dicom = is_dicom(path)
    if frames is None:
        return default_frame if dicom else 0
    if frames == "first" or not (dicom or path.suffix.lower() in TIFF_SUFFIXES):
        return 0  # other raster files hold one frame
    return frames if isinstance(frames, int) else None


def _work(
    folder: Path, files: list[Path], opts: ReadOptions, default_frame: int, done: set[tuple[str, str]]
) -> Iterator[_Item | dict[str, Any]]:
    """Every frame still to process, or an error row for a file that cannot be expanded into frames."""
    for p in files:
        rel = p.relative_to(folder).as_posix()
        cell = csv_name(rel)  # how predictions.csv and errors.csv name it
        known = _known_frame(p, opts.frames, default_frame)
        if (cell, "") in done or (known is not None and (cell, str(known)) in done):
            continue  # finished by an earlier run: not even its header is read again
        if not is_supported(p):
            yield _error(rel, f"unsupported file type '{p.suffix or '(none)'}'")
            continue
        try:
            check_size(p, opts.max_pixels)
            frames = _frames(p, opts.frames, default_frame)
        except Exception as exc:  # one odd file (permissions, a damaged header) must not stop the batch
            yield _error(rel, _reason(exc))
            continue
        for f in frames:
            if (cell, str(f)) not in done:
                yield _Item(p, rel, f)


@dataclass(frozen=True)
class _Frame:
    """One frame read for the model: its item, the read and the model-size copy."""

    item: _Item
    read: ReadResult
    image: np.ndarray


def _load(item: _Item, opts: ReadOptions, size: int, keep_image: bool = True) -> _Frame | dict[str, Any]:
    """Read, check and resize one frame; a failure becomes an error row naming the file.

    Without ``keep_image`` the crop's pixels are dropped once resized (nothing draws an overlay),
    so a worker sends back only the model-size copy.
    """
    try:
        rr = read_scan(item.path, frame=item.frame, crop=opts.crop, region=opts.region)
        if not np.isfinite(rr.image).all():
            raise ReadError(item.path, "image holds NaN or infinite pixel values")
        if min(rr.image.shape) < 2:
            raise ReadError(item.path, f"image (or its crop {rr.crop}) is {rr.image.shape[1]}x{rr.image.shape[0]}")
        small = resize_image(rr.image, size)
    except Exception as exc:  # one odd file (permissions, a codec error) must not stop the batch
        return _error(item.rel, _reason(exc), item.frame)
    if not keep_image:
        rr = replace(rr, image=np.zeros((0, 0), np.float32))
    return _Frame(item, rr, small)


class FrameDataset(Dataset[Any]):
    """The planned work as a map-style dataset keyed by the plan's own entries: an :class:`_Item`
    (a file and frame) is read into a :class:`_Frame` or an error row; a planning error row
    (an unsupported file, a refused header) passes through, so rows keep the plan's order.

    >>> FrameDataset(ReadOptions(), 64)[{"file": "a.txt", "reason": "unsupported"}]["reason"]
    'unsupported'
    """

    def __init__(self, opts: ReadOptions, size: int, keep_image: bool = True) -> None:
        self.opts, self.size, self.keep_image = opts, size, keep_image

    def __getitem__(self, key: _Item | dict[str, Any]) -> _Frame | dict[str, Any]:
        return _load(key, self.opts, self.size, self.keep_image) if isinstance(key, _Item) else key


def _as_is(sample: Any) -> Any:
    """The DataLoader's collate function: samples travel as they are (no tensor conversion)."""
    return sample


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` (the process that started it) dies, even by ``kill -9``.

    On Linux the kernel sends SIGKILL (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread
    watches the parent's PID once a second. A parent already gone ends it at once.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:  # it died before the request was made
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="loris-parent-watch", daemon=True).start()


def _init_worker(_: int, parent: int | None = None) -> None:
    cv2.setNumThreads(0)  # a forked OpenCV thread pool can deadlock; one image per worker needs none
    if parent is not None:
        die_with_parent(parent)  # a killed predict leaves no decoding process behind


def default_workers() -> int:
    """Decoding processes for ``predict``: 2 with more than 2 cores, else none (on 2 cores the model's
    threads already take both, and decoding in workers gained nothing)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 if cores > 2 else 0


def _read_stream(
    work: Iterator[_Item | dict[str, Any]], dataset: FrameDataset, workers: int, prefetch: int
) -> Generator[_Frame | dict[str, Any], None, None]:
    """``dataset`` over ``work`` in order: in this process (``workers=0``) or in a DataLoader whose
    ``workers`` processes each keep ``prefetch`` frames read ahead while the model runs."""
    if workers == 0:
        yield from (dataset[w] for w in work)
        return
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=work,  # planned lazily here, as the workers ask for more
        num_workers=workers,
        prefetch_factor=prefetch,
        collate_fn=_as_is,
        worker_init_fn=functools.partial(_init_worker, parent=os.getpid()),
    )
    yield from loader


def _read_batches(stream: Iterator[_Frame | dict[str, Any]], size: int) -> Iterator[_Batch]:
    """Groups of up to ``size`` frames and error rows, in the stream's order."""
    batch = _Batch()
    for got in stream:
        batch.add(got)
        if len(batch) >= size:
            yield batch
            batch = _Batch()
    if len(batch):
        yield batch


@dataclass(frozen=True)
class _Mapped:
    """One prediction in the scan's own pixels (and its overlay, when one is drawn)."""

    box: tuple[float, float, float, float]
    mask: np.ndarray
    overlay: np.ndarray | None


def _to_original(
    rr: ReadResult, item: _Item, crop: CropMode, size: int, result: BundleOutput, i: int, draw: bool
) -> _Mapped:
    """Box, mask and (with ``draw``) overlay of scan ``i`` mapped from the model's square grid through
    the crop to the scan."""
    x0, y0, x1, y1 = rr.crop
    cw, ch = x1 - x0, y1 - y0
    sx, sy = cw / size, ch / size
    b = result.boxes[i]
    box = rr.box_to_original((float(b[0]) * sx, float(b[1]) * sy, float(b[2]) * sx, float(b[3]) * sy))
    mask = rr.mask_to_original(resize_mask(result.masks[i], (cw, ch)))
    if not draw:
        return _Mapped(box, mask, None)
    heat = cv2.resize(result.heat[i], (cw, ch), interpolation=cv2.INTER_LINEAR)
    # the overlay shows the whole frame, panels included, so one more decode for cropped scans only
    full = read_scan(item.path, frame=item.frame, crop="none").image if rr.cropped and crop != "none" else rr.image
    return _Mapped(box, mask, overlay(full, box, mask, heat, region=rr.crop))


def _dicom_out(
    item: _Item, stem: str, out: Path, bundle: Bundle, m: _Mapped, score: float, source: str, kinds: Sequence[str]
) -> str:
    """Write the DICOM results of one frame; returns their paths relative to ``out``, ';'-joined."""
    from pipeline.serve.dicom_out import Prediction, write_dicom_outputs

    pred = Prediction(
        mask=m.mask,
        score=score,
        threshold=bundle.score_threshold,
        box=m.box,
        model_name=bundle.model_name,
        model_version=bundle.model_version,
        frame=item.frame,
        box_source=source,
    )
    ov = m.overlay if "sc" in kinds else None
    paths = write_dicom_outputs(item.path, pred, confined(out, "dicom"), stem, kinds=kinds, overlay_bgr=ov)
    return ";".join(p.relative_to(out.resolve()).as_posix() for p in paths.values())


@dataclass(frozen=True)
class Outputs:
    """What ``predict`` writes beside the CSVs: ``overlays/`` PNGs and the DICOM kinds under ``dicom/``."""

    overlays: bool = False
    dicom: tuple[str, ...] = ()

    @property
    def draws(self) -> bool:
        """Whether an overlay is drawn (for ``overlays/``, or the DICOM secondary capture)."""
        return self.overlays or "sc" in self.dicom


def _write_outputs(
    folder: Path,
    out: Path,
    bundle: Bundle,
    batch: _Batch,
    result: BundleOutput,
    opts: ReadOptions,
    outputs: Outputs,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The CSV rows (mask as RLE), overlay PNGs and DICOM results of every frame of ``batch``; returns
    its CSV and error rows."""
    rows, errors = [], []
    for i, (item, rr) in enumerate(zip(batch.items, batch.reads)):
        stem = _stem(folder, item.path, item.frame if rr.frame_count > 1 else None)
        m = _to_original(rr, item, opts.crop, bundle.image_size, result, i, outputs.draws)
        ov_rel = ""
        if outputs.overlays and m.overlay is not None:
            ov_rel = f"overlays/{stem}.png"
            write_png(confined(out, ov_rel), m.overlay)
        score, source = float(result.scores[i]), result.sources[i]
        dicom = ""
        if outputs.dicom and is_dicom(item.path):
            try:
                dicom = _dicom_out(item, stem, out, bundle, m, score, source, outputs.dicom)
            except Exception as exc:  # a source DICOM that cannot be referenced must not stop the batch
                errors.append(_error(item.rel, f"dicom-out: {_reason(exc)}", item.frame, rr.sop_instance_uid))
        rows.append(_row(item, rr, m, bundle.score_threshold, result, i) | {"overlay": ov_rel, "dicom": dicom})
    return rows, errors


def _row(item: _Item, rr: ReadResult, m: _Mapped, threshold: float, result: BundleOutput, i: int) -> dict[str, Any]:
    """The ``predictions.csv`` row of frame ``i`` of a batch, less its ``overlay`` and ``dicom`` cells."""
    score = float(result.scores[i])
    w, h = rr.original_size
    return {
        "file": csv_name(item.rel),
        "frame": item.frame,
        "sop_instance_uid": safe_cell(rr.sop_instance_uid or ""),
        "score": f"{score:.6g}",
        "probability": _probability_cell(float(result.probabilities[i])),
        "verdict": "distended" if score >= threshold else "not distended",
        "threshold": f"{threshold:.6g}",
        **{k: f"{v:.1f}" for k, v in zip(("box_x1", "box_y1", "box_x2", "box_y2"), m.box)},
        "box_source": result.sources[i],
        "box_confidence": f"{result.confidences[i]:.4f}",
        "mask_rle": safe_cell(encode_mask(m.mask)["counts"]),  # a run of 13 starts it with '='
        "width": w,
        "height": h,
        **dict(zip(CROP_FIELDS, (*rr.crop, rr.crop_source))),
        "orientation": rr.orientation,
    }


def _probability_cell(p: float) -> str:
    """The ``probability`` cell: four decimals, or empty when the bundle has no calibration (NaN).

    >>> _probability_cell(0.123456), _probability_cell(float("nan"))
    ('0.1235', '')
    """
    return f"{p:.4f}" if np.isfinite(p) else ""


def decode_mask(row: Mapping[str, Any]) -> np.ndarray:
    """The boolean ``[height, width]`` mask of a ``predictions.csv`` row, in the scan's own pixels
    (its ``mask_rle``: COCO compressed RLE, column-major, as :func:`pycocotools.mask.encode` writes).

    >>> mask = np.zeros((3, 4), bool); mask[1, 1:3] = True
    >>> row = {"mask_rle": encode_mask(mask)["counts"], "width": "4", "height": "3"}
    >>> row["mask_rle"], bool((decode_mask(row) == mask).all())
    ('41202', True)
    """
    h, w = int(row["height"]), int(row["width"])
    counts = str(row["mask_rle"]).removeprefix("'")  # the quote safe_cell puts before a leading '='
    return decode_segmentation({"size": [h, w], "counts": counts}, h, w)


def _done(out: Path) -> set[tuple[str, str]]:
    """``(file, frame)`` keys an earlier run finished (``file`` as :func:`csv_name` writes it);
    ``(file, "")`` for a file refused as a whole. Both CSVs are checked before a torn row is cut."""
    pred_csv, err_csv = confined(out, "predictions.csv"), confined(out, "errors.csv")
    rows = _read_rows(pred_csv, PRED_FIELDS) + _read_rows(err_csv, ERR_FIELDS)
    _drop_torn_tail(pred_csv)  # both are ours: the next append starts on a fresh line
    _drop_torn_tail(err_csv)
    return {(r["file"], r["frame"]) for r in rows}


def _predict_batch(
    bundle: Bundle, folder: Path, out: Path, batch: _Batch, opts: ReadOptions, outputs: Outputs
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Predict the frames read into ``batch`` and write their outputs; returns its CSV rows and error rows."""
    if not batch.items:
        return [], batch.errors
    result = bundle.process(np.stack(batch.images))
    rows, late = _write_outputs(folder, out, bundle, batch, result, opts, outputs)
    return rows, batch.errors + late


def process_batch(
    bundle: Bundle, folder: Path, out: Path, items: Sequence[_Item], opts: ReadOptions, outputs: Outputs
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read (in this process), predict and write the output files of ``items``; returns their CSV rows
    and error rows."""
    batch = _Batch()
    for item in items:
        batch.add(_load(item, opts, bundle.image_size, outputs.draws))
    return _predict_batch(bundle, folder, out, batch, opts, outputs)


def _validate(folder: Path, out: Path, batch_size: int, opts: ReadOptions, dicom_out: Sequence[str]) -> ReadOptions:
    """Refuse bad settings before anything is loaded or written; returns ``opts`` with its frames parsed."""
    from pipeline.serve.dicom_out import KINDS

    if batch_size < 1:
        raise ValueError(f"batch size must be 1 or more, not {batch_size}")
    if opts.crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, not {opts.crop!r}")
    if opts.region is not None and (opts.crop == "none" or opts.region < 0):
        raise ValueError(f"--region {opts.region}: needs --crop regions or auto, and an index of 0 or more")
    if opts.max_pixels < 1:
        raise ValueError(f"the pixel limit must be positive, not {opts.max_pixels}")
    unknown = sorted(set(dicom_out) - set(KINDS))
    if unknown:
        raise ValueError(f"--dicom-out: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found")
    check_paths(folder, out)
    return replace(opts, frames=parse_frames(opts.frames))


class _Sink:
    """``predictions.csv`` and ``errors.csv`` appenders, the counts and the progress bar of one run."""

    def __init__(self, out: Path, progress: bool, total: int | None) -> None:
        self.out = out
        self.preds = _CsvAppender(confined(out, "predictions.csv"), PRED_FIELDS)
        self.errs = _CsvAppender(confined(out, "errors.csv"), ERR_FIELDS)
        self.n_ok = self.n_err = 0
        self.bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, file=sys.stderr)

    def write(self, rows: list[dict[str, Any]], errors: list[dict[str, Any]], advance: int) -> None:
        # predictions first: a kill between the two writes never loses a processed image
        self.preds.write(rows)
        self.errs.write(errors)
        self.n_ok, self.n_err = self.n_ok + len(rows), self.n_err + len(errors)
        self.bar.update(advance)

    def close(self) -> None:
        self.bar.close()
        self.preds.close()
        self.errs.close()


@dataclass
class _Plan:
    """What a run has to do: the frames still pending (lazily) and the listing's error rows."""

    work: Iterator[_Item | dict[str, Any]]
    listing_errors: list[dict[str, Any]]
    n_done: int
    total: int | None


def _plan(
    folder: Path, recursive: bool, opts: ReadOptions, default_frame: int, shard: Shard, done: set[tuple[str, str]]
) -> _Plan:
    files, problems = list_inputs(folder, recursive)
    k, n = shard
    if n > 1:  # this run's share of the folder: the files (and unreadable entries) whose path hash is k mod n
        files = [p for p in files if shard_of(p.relative_to(folder).as_posix(), n) == k]
        problems = [(p, why) for p, why in problems if shard_of(p.relative_to(folder).as_posix(), n) == k]
    listing = [_error(p.relative_to(folder).as_posix(), why) for p, why in problems]
    listing = [e for e in listing if (e["file"], "") not in done]
    total = None if opts.frames == "all" else len(files)
    return _Plan(_work(folder, files, opts, default_frame, done), listing, len(done), total)


def _finish(out: Path, sink: _Sink, seconds: float, n_done: int, review: bool) -> dict[str, Any]:
    page = None
    if review:
        from pipeline.serve.review import write_review

        page = write_review(out)
    stats = _report(seconds, sink.n_ok, sink.n_err, n_done, confined(out, "errors.csv"))
    stats["review"] = page
    return stats


@dataclass
class Job:
    """One run's fixed inputs, as an :data:`Engine` sees them. ``bundle`` is the driver's loaded copy
    (an engine whose workers load their own may drop it); ``workers`` and ``prefetch`` are the
    local engine's decoding processes and the frames each reads ahead."""

    bundle_dir: Path
    device: str
    folder: Path
    out: Path
    opts: ReadOptions
    outputs: Outputs
    batch_size: int
    progress: bool
    bundle: Bundle | None
    workers: int = 0
    prefetch: int = 2
    runtime: str = "torch"


# Processes a run's pending frames into the sink it returns (closed), timing the work as "predict".
Engine = Callable[[Job, _Plan, Stopwatch], _Sink]


def local_engine(job: Job, plan: _Plan, watch: Stopwatch) -> _Sink:
    """The default :data:`Engine`: this process runs the model one batch at a time as the folder is
    listed, with ``job.workers`` DataLoader processes decoding the next frames meanwhile."""
    if job.bundle is None:
        raise ValueError("the local engine runs the job's own bundle, and this job has none")
    sink = _Sink(job.out, job.progress, plan.total)
    dataset = FrameDataset(job.opts, job.bundle.image_size, keep_image=job.outputs.draws)
    stream = _read_stream(plan.work, dataset, job.workers, job.prefetch)
    try:
        sink.write([], plan.listing_errors, 0)
        with watch("predict"):
            for batch in _read_batches(stream, job.batch_size):
                advance = len(batch)
                rows, errors = _predict_batch(job.bundle, job.folder, job.out, batch, job.opts, job.outputs)
                sink.write(rows, errors, advance)
    finally:
        stream.close()  # stops the DataLoader's workers
        sink.close()
    return sink


MANIFEST = "predict.json"
RUNTIMES = ("torch", "onnxruntime")


def bundle_digest(directory: Path) -> str:
    """SHA-256 of a bundle's files (relative path and contents): ``bundle.json``, ``detector/`` and
    ``unet/`` when it has a ``bundle.json`` (its training scratch ``work/`` is left out), else every file."""
    directory = Path(directory)
    if (directory / "bundle.json").is_file():
        parts = [directory / "bundle.json"]
        parts += [p for d in ("detector", "unet") for p in (directory / d).rglob("*")]
    else:
        parts = list(directory.rglob("*"))
    h = hashlib.sha256()
    for p in sorted(q for q in parts if q.is_file()):
        with open(p, "rb") as fh:
            h.update(p.relative_to(directory).as_posix().encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def _manifest(job: Job, bundle: Bundle, shard: Shard) -> dict[str, Any]:
    """``predict.json``: the bundle (and runtime) and the shard that made an output folder, for resume and merge."""
    return {
        "format": 1,
        "bundle": {
            "digest": bundle_digest(job.bundle_dir),
            "model_name": bundle.model_name,
            "model_version": bundle.model_version,
            "runtime": job.runtime,
        },
        "shard": {"n": shard[1], "k": [shard[0]]},
        "read": {"crop": job.opts.crop, "region": job.opts.region, "frames": job.opts.frames},
        "overlays": job.outputs.overlays,
        "dicom_out": list(job.outputs.dicom),
    }


def _describe(bundle: dict[str, Any]) -> str:
    return (
        f"{bundle.get('model_name')} version {bundle.get('model_version')} on {bundle.get('runtime')} "
        f"(files {str(bundle.get('digest'))[:12]})"
    )


def _shard_text(shard: dict[str, Any]) -> str:
    return ",".join(f"{k}/{shard['n']}" for k in shard["k"])


def read_manifest(folder: Path) -> dict[str, Any]:
    """The ``predict.json`` of an output folder; refuses a folder without one, or a damaged one, naming it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a predict output folder, or one from an older version)")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a LoRIS {MANIFEST} ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != 1 or "bundle" not in doc or "shard" not in doc:
        raise ValueError(f"{path}: not a predict manifest of this version")
    return doc


# the settings that change what a row means, and the option that sets each: a resume must keep them
SETTINGS = {
    "--crop": ("read", "crop"),
    "--region": ("read", "region"),
    "--frames": ("read", "frames"),
    "--overlays": ("overlays",),
    "--dicom-out": ("dicom_out",),
}
_ABSENT = object()


def _setting(doc: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = doc
    for k in keys:
        if not isinstance(value, Mapping) or k not in value:
            return _ABSENT  # a manifest from before the setting was recorded
        value = value[k]
    return sorted(value) if isinstance(value, list) else value


def _show(option: str, value: Any) -> str:
    if option == "--overlays":
        return option if value else f"no {option}"
    if option == "--dicom-out":
        return f"{option} {','.join(value)}" if value else f"no {option}"
    return f"no {option}" if value is None else f"{option} {value}"


def _settings_differ(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first setting two manifests differ in, as ``("--crop regions", "--crop auto")``; None when none."""
    for option, keys in SETTINGS.items():
        a, b = _setting(old, keys), _setting(new, keys)
        if a is not _ABSENT and b is not _ABSENT and a != b:
            return _show(option, a), _show(option, b)
    return None


def check_resume(out: Path, manifest: dict[str, Any]) -> set[tuple[str, str]]:
    """Refuse to continue ``out`` unless it was begun with this bundle, shard and settings (its
    ``predict.json``); returns the ``(file, frame)`` keys already done. Results without a
    ``predict.json`` are refused too, as are CSVs that are not LoRIS's. Nothing is written but the
    cut of a half row a killed run left."""
    path = confined(out, MANIFEST)
    if not path.is_file():
        found = [n for n in ("predictions.csv", "errors.csv") if confined(out, n).exists()]
        if found:
            raise ValueError(
                f"--out {out} holds {' and '.join(found)} but no {MANIFEST}, so the bundle and settings that "
                f"made them cannot be checked: restore its {MANIFEST}, or choose a new --out"
            )
        return set()
    old = read_manifest(out)
    if old["bundle"] != manifest["bundle"]:
        raise ValueError(
            f"--out {out} holds the results of {_describe(old['bundle'])}, not of this bundle "
            f"({_describe(manifest['bundle'])}): choose a new --out"
        )
    if old["shard"] != manifest["shard"]:
        raise ValueError(
            f"--out {out} holds shard {_shard_text(old['shard'])}, not {_shard_text(manifest['shard'])}: "
            "choose a new --out"
        )
    differ = _settings_differ(old, manifest)
    if differ:
        raise ValueError(
            f"--out {out} was begun with {differ[0]} and this run has {differ[1]} (see {path}): "
            f"rerun with {differ[0]} to resume it, or choose a new --out"
        )
    return _done(out)


def _check_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder; choose another --out")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold ``<out>/.lock`` while the block writes ``out`` (``predict``, ``merge``, ``export``): a
    second process refuses at once (naming the holder's PID) before it writes anything, and the lock
    goes with the process, also when it is killed. The run folders' lock
    (:func:`pipeline.run_dirs.run_lock`), without its check that ``out`` holds a run: when the block
    wrote nothing, the lock file is removed, and so is ``out`` if this call created it."""
    from pipeline.run_dirs import run_lock

    with run_lock(Path(out), check=_check_folder) as locked:
        yield locked


def _load_bundle(bundle_dir: Path, device: str, runtime: str) -> Bundle:
    if runtime == "onnxruntime":
        import torch

        # the ONNX Runtime loader is optional; imported by name so the rest works without it.
        # ORT takes torch's thread count, so both runtimes are measured on the same cores
        loader = importlib.import_module("pipeline.serve.onnx_bundle").load_onnx_bundle
        loaded: Bundle = loader(bundle_dir, device, threads=torch.get_num_threads())
        return loaded
    return Bundle.load(bundle_dir, device=device)


def predict_folder(
    bundle_dir: Path,
    folder: Path,
    out: Path,
    recursive: bool = False,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    read: ReadOptions | None = None,
    dicom_out: Sequence[str] = (),
    review: bool = True,
    engine: Engine = local_engine,
    overlays: bool = False,
    shard: Shard | str | None = None,
    workers: int | None = None,
    prefetch: int = 2,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Process every file of ``folder`` (or its ``shard``); returns counts and throughput. Resumes a killed run.

    ``read``: crop mode, region, frames and pixel limit (:class:`ReadOptions`); ``dicom_out``: the
    DICOM kinds (``seg``, ``sr``, ``sc``) written under ``out/dicom/`` for DICOM inputs; ``review``:
    write the review page at the end (its path is ``stats["review"]``); ``engine``: what processes
    the frames (:func:`local_engine`, or :class:`pipeline.serve.predict.ray_engine.RayEngine`'s Ray Data actors);
    ``overlays``: also write ``overlays/<name>.png``; ``shard``: ``(k, n)`` or ``"k/n"``, this run's
    share of the files (:func:`shard_of`); ``workers`` (default :func:`default_workers`) and
    ``prefetch``: the local engine's decoding processes and frames read ahead by each; ``runtime``:
    ``torch`` (:meth:`Bundle.load`) or ``onnxruntime`` (``pipeline.serve.onnx_bundle.load_onnx_bundle``).
    """
    bundle_dir, folder, out = Path(bundle_dir), Path(folder), Path(out)
    opts = _validate(folder, out, batch_size, read or ReadOptions(), dicom_out)
    part, n_workers = _run_options(shard, workers, prefetch, runtime)
    with output_lock(out):  # one process at a time writes out
        bundle = _load_bundle(bundle_dir, device, runtime)  # a damaged bundle is named before any work
        outputs = Outputs(overlays, tuple(dicom_out))
        job = Job(
            bundle_dir, device, folder, out, opts, outputs, batch_size, progress, bundle, n_workers, prefetch, runtime
        )
        manifest = _manifest(job, bundle, part)
        done = check_resume(out, manifest)  # refused before anything is written
        atomic_write_text(confined(out, MANIFEST), json.dumps(manifest, indent=1) + "\n")
        plan = _plan(folder, recursive, opts, bundle.frame, part, done)
        del bundle  # the job holds it, so an engine that does not need it can let it go
        watch = Stopwatch()
        sink = engine(job, plan, watch)
        return _finish(out, sink, watch.seconds.get("predict", 0.0), plan.n_done, review)


def _run_options(shard: Shard | str | None, workers: int | None, prefetch: int, runtime: str) -> tuple[Shard, int]:
    """``predict_folder``'s shard (``(0, 1)``: the whole folder) and decoding processes, checked with its
    prefetch and runtime."""
    part = (parse_shard(shard) if isinstance(shard, str) else shard) or (0, 1)
    if not 0 <= part[0] < part[1]:
        raise ValueError(f"shard {part[0]}/{part[1]}: K/N needs 0 <= K < N")
    n_workers = default_workers() if workers is None else workers
    if n_workers < 0 or prefetch < 1:
        raise ValueError(f"workers must be 0 or more and prefetch 1 or more, not {n_workers} and {prefetch}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    return part, n_workers


def _ends_cleanly(path: Path) -> bool:
    """Whether a CSV is missing, empty or ends with a newline (no row cut by a killed run)."""
    if not path.is_file() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _row_key(row: Mapping[str, str]) -> tuple[str, int, str]:
    frame = row.get("frame", "")
    return row["file"], int(frame) if frame.isdigit() else -1, row.get("reason", "")


def _csv_text(rows: list[dict[str, str]], fields: list[str]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(sorted(rows, key=_row_key))
    return text.getvalue()


def _check_shards(folders: list[Path], docs: list[dict[str, Any]]) -> dict[int, Path]:
    """Refuse folders of another bundle, of another split or holding the same shard; returns shard -> folder."""
    first, n = docs[0], docs[0]["shard"]["n"]
    owner: dict[int, Path] = {}
    for f, d in zip(folders, docs):
        if d["bundle"] != first["bundle"]:
            raise ValueError(
                f"merge: {f} was made with {_describe(d['bundle'])} and {folders[0]} with "
                f"{_describe(first['bundle'])}: merge only the folders of one bundle"
            )
        differ = _settings_differ(d, first)
        if differ:
            raise ValueError(
                f"merge: {f} was made with {differ[0]} and {folders[0]} with {differ[1]}: "
                "merge the shards of one predict command"
            )
        if d["shard"]["n"] != n:
            raise ValueError(
                f"merge: {f} holds shard {_shard_text(d['shard'])} and {folders[0]} shard "
                f"{_shard_text(first['shard'])}: shards of two splits overlap; merge the shards of one K/N split"
            )
        for k in d["shard"]["k"]:
            if k in owner:
                raise ValueError(f"merge: {owner[k]} and {f} both hold shard {k}/{n}: merge each shard once")
            owner[k] = f
    return owner


def _gather(folders: list[Path]) -> tuple[list[tuple[Path, dict[str, str]]], list[dict[str, str]]]:
    """Every shard's prediction rows (with their folder) and error rows; refuses a file found in two folders."""
    preds: list[tuple[Path, dict[str, str]]] = []
    errors: list[dict[str, str]] = []
    where: dict[str, Path] = {}
    for f in folders:
        for name, fields in (("predictions.csv", PRED_FIELDS), ("errors.csv", ERR_FIELDS)):
            path = f / name
            if not _ends_cleanly(path):
                raise ValueError(f"merge: {path} ends in a cut row: rerun that shard's predict to finish it")
            rows = _read_rows(path, fields)
            for r in rows:
                seen = where.setdefault(r["file"], f)
                if seen != f:
                    raise ValueError(f"merge: {r['file']} is in both {seen} and {f}: the folders overlap")
            if name == "errors.csv":
                errors += rows
            else:
                preds += [(f, r) for r in rows]
    return preds, errors


def _bring(preds: list[tuple[Path, dict[str, str]]], out: Path, move: bool) -> tuple[int, int]:
    """Copy (or move) the overlay and DICOM files the rows name into ``out``; returns (brought, missing)."""
    brought = missing = 0
    for f, r in preds:
        for rel in [r["overlay"], *r["dicom"].split(";")]:
            if not rel:
                continue
            src, dst = confined(f, rel), confined(out, rel)
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                if move:
                    shutil.move(src, dst)
                else:
                    shutil.copy2(src, dst)
            elif not (move and dst.is_file()):  # a rerun of an interrupted --move finds it in place
                missing += 1
                continue
            brought += 1
    return brought, missing


def merge_outputs(folders: Sequence[Path], out: Path, move: bool = False, review: bool = True) -> dict[str, Any]:
    """Join the ``predict`` output folders of one run's shards into ``out``.

    Writes ``predictions.csv`` and ``errors.csv`` (sorted by file and frame), the overlay and DICOM
    files their rows name (copied, or moved with ``move``), ``predict.json`` and the review page.
    Refuses folders made with another bundle or runtime, shards of another split, a shard given
    twice, a file found in two folders, and an ``out`` that already holds results. Returns the row
    and file counts, the shards merged and missing, and the review page's path.
    """
    folders, out = [Path(f) for f in folders], Path(out)
    if not folders:
        raise ValueError("merge: name at least one predict output folder")
    for f in folders:
        check_paths(f, out)
    with output_lock(out), _shards_idle(folders):
        return _merge(folders, out, move, review)


@contextlib.contextmanager
def _shards_idle(folders: list[Path]) -> Iterator[None]:
    """Hold the lock of every shard folder that has one, so none is merged while a ``predict`` writes it."""
    from filelock import FileLock, Timeout

    from pipeline.run_dirs import LOCK

    with contextlib.ExitStack() as stack:
        for f in folders:
            if not (f / LOCK).is_file():
                continue
            lock = FileLock(str(f / LOCK))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise ValueError(f"merge: {f} is being written by a running predict; wait for it to finish") from None
            except OSError:
                continue  # a read-only folder: no predict can be writing it
            stack.callback(lock.release)
        yield


def _merge(folders: list[Path], out: Path, move: bool, review: bool) -> dict[str, Any]:
    """:func:`merge_outputs` once ``out`` is locked."""
    if any(confined(out, n).exists() for n in ("predictions.csv", "errors.csv", MANIFEST)):
        raise ValueError(f"--out {out} already holds predict results: choose a new --out")
    docs = [read_manifest(f) for f in folders]
    owner = _check_shards(folders, docs)
    preds, errors = _gather(folders)
    brought, missing = _bring(preds, out, move)
    atomic_write_text(confined(out, "predictions.csv"), _csv_text([r for _, r in preds], PRED_FIELDS))
    atomic_write_text(confined(out, "errors.csv"), _csv_text(errors, ERR_FIELDS))
    n = docs[0]["shard"]["n"]
    manifest = {**docs[0], "shard": {"n": n, "k": sorted(owner)}, "merged_from": [str(f) for f in folders]}
    atomic_write_text(confined(out, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    page = None
    if review:
        from pipeline.serve.review import write_review

        page = write_review(out)
    return {
        "predictions": len(preds),
        "errors": len(errors),
        "files": brought,
        "missing_files": missing,
        "shards": sorted(owner),
        "missing_shards": sorted(set(range(n)) - set(owner)),
        "n": n,
        "review": page,
    }


def _report(elapsed: float, n_ok: int, n_err: int, n_done: int, err_csv: Path) -> dict[str, Any]:
    stats = {
        "processed": n_ok,
        "errors": n_err,
        "skipped_already_done": n_done,
        "seconds": elapsed,
        "images_per_s": n_ok / elapsed if elapsed > 0 and n_ok else 0.0,
    }
    print(
        f"predict: {n_ok} image(s) in {elapsed:.1f} s ({stats['images_per_s']:.2f} images/s), "
        f"{n_err} error(s) in {err_csv}, {n_done} already done",
        file=sys.stderr,
    )
    return stats
