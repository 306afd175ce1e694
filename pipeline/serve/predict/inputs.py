"""What ``predict`` reads: the input folder listed and sharded, each file expanded into the frames still
to do (:func:`plan_work`, a :class:`Plan` of :class:`Item`), each frame read, checked and resized
(:func:`load_frame`, a :class:`Frame` or an error row), by ``workers`` DataLoader processes while the model
runs (:func:`read_stream`), in batches (:class:`Batch`).

One bad file never stops the batch: unsupported, unreadable or corrupt files, symbolic-link loops,
broken links, special files and images over ``max_pixels`` (checked from the header, before decoding)
become error rows with the reason.

>>> shard_of("a/b.png", 1)
0
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
import sys
import threading
import time
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from pipeline.serve.predict.csv_rows import csv_name, error_row, reason_of
from pipeline.serve.predict.options import FrameSpec, ReadOptions, Shard
from scans.readers import (
    TIFF_SUFFIXES,
    ReadError,
    ReadResult,
    frame_indices,
    is_dicom,
    is_supported,
    read_scan,
    resize_image,
)


def shard_of(rel: str, n: int) -> int:
    """The shard (0 to ``n - 1``) of a file: the SHA-256 of its path relative to the input folder, modulo
    ``n``, the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(os.fsencode(rel)).digest()[:8], "big") % n


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


@dataclass(frozen=True)
class Item:
    """One frame of one input file to process."""

    path: Path
    rel: str
    frame: int


@dataclass
class Batch:
    """The frames read for one batch (cropped reads and model-size copies) and the rows of the others."""

    items: list[Item] = field(default_factory=list)
    reads: list[ReadResult] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, got: Frame | dict[str, Any]) -> None:
        if isinstance(got, Frame):
            self.items.append(got.item)
            self.reads.append(got.read)
            self.images.append(got.image)
        else:
            self.errors.append(got)

    def __len__(self) -> int:
        return len(self.items) + len(self.errors)


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
) -> Iterator[Item | dict[str, Any]]:
    """Every frame still to process, or an error row for a file that cannot be expanded into frames."""
    for p in files:
        rel = p.relative_to(folder).as_posix()
        cell = csv_name(rel)  # how predictions.csv and errors.csv name it
        known = _known_frame(p, opts.frames, default_frame)
        if (cell, "") in done or (known is not None and (cell, str(known)) in done):
            continue  # finished by an earlier run: not even its header is read again
        if not is_supported(p):
            yield error_row(rel, f"unsupported file type '{p.suffix or '(none)'}'")
            continue
        try:
            check_size(p, opts.max_pixels)
            frames = _frames(p, opts.frames, default_frame)
        except Exception as exc:  # one odd file (permissions, a damaged header) must not stop the batch
            yield error_row(rel, reason_of(exc))
            continue
        for f in frames:
            if (cell, str(f)) not in done:
                yield Item(p, rel, f)


@dataclass(frozen=True)
class Frame:
    """One frame read for the model: its item, the read and the model-size copy."""

    item: Item
    read: ReadResult
    image: np.ndarray


def load_frame(item: Item, opts: ReadOptions, size: int, keep_image: bool = True) -> Frame | dict[str, Any]:
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
        return error_row(item.rel, reason_of(exc), item.frame)
    if not keep_image:
        rr = replace(rr, image=np.zeros((0, 0), np.float32))
    return Frame(item, rr, small)


class FrameDataset(Dataset[Any]):
    """The planned work as a map-style dataset keyed by the plan's own entries: an :class:`Item`
    (a file and frame) is read into a :class:`Frame` or an error row; a planning error row
    (an unsupported file, a refused header) passes through, so rows keep the plan's order.

    >>> FrameDataset(ReadOptions(), 64)[{"file": "a.txt", "reason": "unsupported"}]["reason"]
    'unsupported'
    """

    def __init__(self, opts: ReadOptions, size: int, keep_image: bool = True) -> None:
        self.opts, self.size, self.keep_image = opts, size, keep_image

    def __getitem__(self, key: Item | dict[str, Any]) -> Frame | dict[str, Any]:
        return load_frame(key, self.opts, self.size, self.keep_image) if isinstance(key, Item) else key


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


def read_stream(
    work: Iterator[Item | dict[str, Any]], dataset: FrameDataset, workers: int, prefetch: int
) -> Generator[Frame | dict[str, Any], None, None]:
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


def read_batches(stream: Iterator[Frame | dict[str, Any]], size: int) -> Iterator[Batch]:
    """Groups of up to ``size`` frames and error rows, in the stream's order."""
    batch = Batch()
    for got in stream:
        batch.add(got)
        if len(batch) >= size:
            yield batch
            batch = Batch()
    if len(batch):
        yield batch


@dataclass
class Plan:
    """What a run has to do: the frames still pending (lazily) and the listing's error rows."""

    work: Iterator[Item | dict[str, Any]]
    listing_errors: list[dict[str, Any]]
    n_done: int
    total: int | None


def plan_work(
    folder: Path, recursive: bool, opts: ReadOptions, default_frame: int, shard: Shard, done: set[tuple[str, str]]
) -> Plan:
    files, problems = list_inputs(folder, recursive)
    k, n = shard
    if n > 1:  # this run's share of the folder: the files (and unreadable entries) whose path hash is k mod n
        files = [p for p in files if shard_of(p.relative_to(folder).as_posix(), n) == k]
        problems = [(p, why) for p, why in problems if shard_of(p.relative_to(folder).as_posix(), n) == k]
    listing = [error_row(p.relative_to(folder).as_posix(), why) for p, why in problems]
    listing = [e for e in listing if (e["file"], "") not in done]
    total = None if opts.frames == "all" else len(files)
    return Plan(_work(folder, files, opts, default_frame, done), listing, len(done), total)
