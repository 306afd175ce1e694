"""Batch processing of a new scan folder with a trained bundle (``python -m pipeline predict``).

Every image is read with :func:`scans.readers.read_scan`: DICOMs are cropped to their B-mode
ultrasound region (``crop="regions"``, the default, acts only when a file has one; ``"auto"``
also finds the region from the pixels; ``"none"`` never crops), the model runs on the crop, and
the box, mask and overlay are mapped back to the scan's own pixels. Cine files give one frame
(``frames="first"``, a frame number) or one row per frame (``"all"``).

It writes ``predictions.csv`` (keyed by file path and frame, with the SOP Instance UID and the
crop), ``masks/<name>.png``, ``overlays/<name>.png``, ``errors.csv`` and ``review.html``
(:mod:`pipeline.review`); with ``dicom_out`` also SEG/SR/SC objects under ``dicom/``
(:mod:`pipeline.dicom_out`). No patient tag reaches the CSV, PNG or HTML outputs
(docs/design.md, "Outputs for clinicians and PACS").

One bad file never stops the batch: unsupported, unreadable or corrupt files, symbolic-link
loops, broken links, special files and images over ``max_pixels`` (checked from the header,
before decoding) go to ``errors.csv`` with the reason. Rows are appended and flushed per batch,
images are written atomically, and a rerun skips what ``predictions.csv`` and ``errors.csv``
already hold.

>>> parse_frames("all"), parse_frames("3"), parse_frames(None)
('all', 3, None)
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import locale
import os
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.bundle import Bundle, BundleOutput
from scans.io import confined, write_png
from scans.readers import (
    CROP_MODES,
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
from scans.runtime import Stopwatch

DEFAULT_MAX_PIXELS = 50_000_000  # per frame; an 8-bit 50 MP image already takes ~1 GB once converted to float
CROP_FIELDS = ["crop_x0", "crop_y0", "crop_x1", "crop_y1", "crop_source"]
PRED_FIELDS = [
    "file",
    "frame",
    "sop_instance_uid",
    "score",
    "verdict",
    "threshold",
    "box_x1",
    "box_y1",
    "box_x2",
    "box_y2",
    "box_source",
    "box_confidence",
    "mask",
    "overlay",
    "width",
    "height",
    *CROP_FIELDS,
    "dicom",
]
ERR_FIELDS = ["file", "frame", "sop_instance_uid", "reason"]
FrameSpec = str | int | None


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
    digest = hashlib.sha1(rel.encode()).hexdigest()[:6]
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
    """The rows of an output CSV from an earlier run; refuses one written with other columns."""
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != fields:
            raise ValueError(
                f"{path} has the columns of another predict version ({', '.join(reader.fieldnames or [])}): "
                "choose a new --out"
            )
        return list(reader)


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


def _error(rel: str, reason: str, frame: int | str = "", uid: str | None = None) -> dict[str, Any]:
    return {"file": rel, "frame": frame, "sop_instance_uid": uid or "", "reason": reason}


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
    """The one frame ``frames`` selects in ``path`` when it is known without reading the header."""
    if not is_dicom(path):
        return 0
    if frames is None:
        return default_frame
    if frames == "first":
        return 0
    return frames if isinstance(frames, int) else None


def _work(
    folder: Path, files: list[Path], opts: ReadOptions, default_frame: int, done: set[tuple[str, str]]
) -> Iterator[_Item | dict[str, Any]]:
    """Every frame still to process, or an error row for a file that cannot be expanded into frames."""
    for p in files:
        rel = p.relative_to(folder).as_posix()
        known = _known_frame(p, opts.frames, default_frame)
        if (rel, "") in done or (known is not None and (rel, str(known)) in done):
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
            if (rel, str(f)) not in done:
                yield _Item(p, rel, f)


def _read(batch: _Batch, item: _Item, opts: ReadOptions, size: int) -> None:
    """Read one frame into ``batch``; a failure becomes an error row."""
    try:
        rr = read_scan(item.path, frame=item.frame, crop=opts.crop, region=opts.region)
        if not np.isfinite(rr.image).all():
            raise ReadError(item.path, "image holds NaN or infinite pixel values")
        if min(rr.image.shape) < 2:
            raise ReadError(item.path, f"image (or its crop {rr.crop}) is {rr.image.shape[1]}x{rr.image.shape[0]}")
    except Exception as exc:  # one odd file (permissions, a codec error) must not stop the batch
        batch.errors.append(_error(item.rel, _reason(exc), item.frame))
        return
    batch.items.append(item)
    batch.reads.append(rr)
    batch.images.append(resize_image(rr.image, size))


@dataclass(frozen=True)
class _Mapped:
    """One prediction in the scan's own pixels."""

    box: tuple[float, float, float, float]
    mask: np.ndarray
    overlay: np.ndarray


def _to_original(rr: ReadResult, item: _Item, crop: CropMode, size: int, result: BundleOutput, i: int) -> _Mapped:
    """Box, mask and overlay of scan ``i`` mapped from the model's square grid through the crop to the scan."""
    x0, y0, x1, y1 = rr.crop
    cw, ch = x1 - x0, y1 - y0
    sx, sy = cw / size, ch / size
    b = result.boxes[i]
    box = rr.box_to_original((float(b[0]) * sx, float(b[1]) * sy, float(b[2]) * sx, float(b[3]) * sy))
    mask = rr.mask_to_original(resize_mask(result.masks[i], (cw, ch)))
    heat = cv2.resize(result.heat[i], (cw, ch), interpolation=cv2.INTER_LINEAR)
    # the overlay shows the whole frame, panels included, so one more decode for cropped scans only
    full = read_scan(item.path, frame=item.frame, crop="none").image if rr.cropped and crop != "none" else rr.image
    return _Mapped(box, mask, overlay(full, box, mask, heat, region=rr.crop))


def _dicom_out(
    item: _Item, stem: str, out: Path, bundle: Bundle, m: _Mapped, score: float, source: str, kinds: Sequence[str]
) -> str:
    """Write the DICOM results of one frame; returns their paths relative to ``out``, ';'-joined."""
    from pipeline.dicom_out import Prediction, write_dicom_outputs

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


def _write_outputs(
    folder: Path,
    out: Path,
    bundle: Bundle,
    batch: _Batch,
    result: BundleOutput,
    opts: ReadOptions,
    dicom_kinds: Sequence[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Mask and overlay PNGs (and DICOM results) of every frame of ``batch``; returns its CSV and error rows."""
    rows, errors = [], []
    for i, (item, rr) in enumerate(zip(batch.items, batch.reads)):
        stem = _stem(folder, item.path, item.frame if rr.frame_count > 1 else None)
        mask_rel, ov_rel = f"masks/{stem}.png", f"overlays/{stem}.png"
        m = _to_original(rr, item, opts.crop, bundle.image_size, result, i)
        write_png(confined(out, mask_rel), m.mask.astype(np.uint8) * 255)
        write_png(confined(out, ov_rel), m.overlay)
        score, source = float(result.scores[i]), result.sources[i]
        dicom = ""
        if dicom_kinds and is_dicom(item.path):
            try:
                dicom = _dicom_out(item, stem, out, bundle, m, score, source, dicom_kinds)
            except Exception as exc:  # a source DICOM that cannot be referenced must not stop the batch
                errors.append(_error(item.rel, f"dicom-out: {_reason(exc)}", item.frame, rr.sop_instance_uid))
        w, h = rr.original_size
        rows.append(
            {
                "file": item.rel,
                "frame": item.frame,
                "sop_instance_uid": rr.sop_instance_uid or "",
                "score": f"{score:.6g}",
                "verdict": "distended" if score >= bundle.score_threshold else "not distended",
                "threshold": f"{bundle.score_threshold:.6g}",
                **{k: f"{v:.1f}" for k, v in zip(("box_x1", "box_y1", "box_x2", "box_y2"), m.box)},
                "box_source": source,
                "box_confidence": f"{result.confidences[i]:.4f}",
                "mask": mask_rel,
                "overlay": ov_rel,
                "width": w,
                "height": h,
                **dict(zip(CROP_FIELDS, (*rr.crop, rr.crop_source))),
                "dicom": dicom,
            }
        )
    return rows, errors


def _done(out: Path) -> set[tuple[str, str]]:
    """``(file, frame)`` keys an earlier run finished; ``(file, "")`` for a file refused as a whole."""
    pred_csv, err_csv = confined(out, "predictions.csv"), confined(out, "errors.csv")
    _drop_torn_tail(pred_csv)
    _drop_torn_tail(err_csv)
    done = {(r["file"], r["frame"]) for r in _read_rows(pred_csv, PRED_FIELDS)}
    return done | {(r["file"], r["frame"]) for r in _read_rows(err_csv, ERR_FIELDS)}


def _batches(work: Iterator[_Item | dict[str, Any]], size: int) -> Iterator[tuple[list[_Item], list[dict[str, Any]]]]:
    """Groups of up to ``size`` frames, with the error rows met on the way."""
    items: list[_Item] = []
    errors: list[dict[str, Any]] = []
    for w in work:
        if isinstance(w, _Item):
            items.append(w)
        else:
            errors.append(w)
        if len(items) >= size:
            yield items, errors
            items, errors = [], []
    if items or errors:
        yield items, errors


def process_batch(
    bundle: Bundle, folder: Path, out: Path, items: Sequence[_Item], opts: ReadOptions, dicom_kinds: Sequence[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read, predict and write the output files of ``items``; returns their CSV rows and error rows."""
    batch = _Batch()
    for item in items:
        _read(batch, item, opts, bundle.image_size)
    if not batch.items:
        return [], batch.errors
    result = bundle.process(np.stack(batch.images))
    rows, late = _write_outputs(folder, out, bundle, batch, result, opts, dicom_kinds)
    return rows, batch.errors + late


def _validate(folder: Path, out: Path, batch_size: int, opts: ReadOptions, dicom_out: Sequence[str]) -> ReadOptions:
    """Refuse bad settings before anything is loaded or written; returns ``opts`` with its frames parsed."""
    from pipeline.dicom_out import KINDS

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


def _plan(folder: Path, out: Path, recursive: bool, opts: ReadOptions, default_frame: int) -> _Plan:
    out.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    files, problems = list_inputs(folder, recursive)
    listing = [_error(p.relative_to(folder).as_posix(), why) for p, why in problems]
    listing = [e for e in listing if (e["file"], "") not in done]
    total = None if opts.frames == "all" else len(files)
    return _Plan(_work(folder, files, opts, default_frame, done), listing, len(done), total)


def _finish(out: Path, sink: _Sink, seconds: float, n_done: int, review: bool) -> dict[str, Any]:
    if review:
        from pipeline.review import write_review

        write_review(out)
    return _report(seconds, sink.n_ok, sink.n_err, n_done, confined(out, "errors.csv"))


@dataclass
class Job:
    """One run's fixed inputs, as an :data:`Engine` sees them. ``bundle`` is the driver's loaded copy
    (an engine whose workers load their own may drop it)."""

    bundle_dir: Path
    device: str
    folder: Path
    out: Path
    opts: ReadOptions
    dicom_out: tuple[str, ...]
    batch_size: int
    progress: bool
    bundle: Bundle | None


# Processes a run's pending frames into the sink it returns (closed), timing the work as "predict".
Engine = Callable[[Job, _Plan, Stopwatch], _Sink]


def local_engine(job: Job, plan: _Plan, watch: Stopwatch) -> _Sink:
    """The default :data:`Engine`: this process, one batch at a time as the folder is listed."""
    if job.bundle is None:
        raise ValueError("the local engine runs the job's own bundle, and this job has none")
    sink = _Sink(job.out, job.progress, plan.total)
    try:
        sink.write([], plan.listing_errors, 0)
        with watch("predict"):
            for items, early in _batches(plan.work, job.batch_size):
                rows, errors = process_batch(job.bundle, job.folder, job.out, items, job.opts, job.dicom_out)
                sink.write(rows, early + errors, len(items) + len(early))
    finally:
        sink.close()
    return sink


def predict_folder(
    bundle_dir: Path,
    folder: Path,
    out: Path,
    recursive: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
    read: ReadOptions | None = None,
    dicom_out: Sequence[str] = (),
    review: bool = True,
    engine: Engine = local_engine,
) -> dict[str, Any]:
    """Process every file of ``folder``; returns counts and throughput. Resumes a killed run.

    ``read``: crop mode, region, frames and pixel limit (:class:`ReadOptions`); ``dicom_out``: the
    DICOM kinds (``seg``, ``sr``, ``sc``) written under ``out/dicom/`` for DICOM inputs; ``review``:
    write ``review.html`` at the end; ``engine``: what processes the frames (:func:`local_engine`, or
    :class:`pipeline.predict_ray.RayEngine`'s Ray Data actors).
    """
    folder, out = Path(folder), Path(out)
    opts = _validate(folder, out, batch_size, read or ReadOptions(), dicom_out)
    bundle = Bundle.load(Path(bundle_dir), device=device)  # a damaged bundle is named before any work starts
    plan = _plan(folder, out, recursive, opts, bundle.frame)
    job = Job(Path(bundle_dir), device, folder, out, opts, tuple(dicom_out), batch_size, progress, bundle)
    del bundle  # the job holds it, so an engine that does not need it can let it go
    watch = Stopwatch()
    sink = engine(job, plan, watch)
    return _finish(out, sink, watch.seconds.get("predict", 0.0), plan.n_done, review)


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
