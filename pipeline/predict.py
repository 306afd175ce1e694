"""Batch processing of a new scan folder with a trained bundle (``python -m pipeline predict``).

For every readable image it writes the score, the verdict, the box and its source to
``predictions.csv``, plus ``masks/<name>.png`` and ``overlays/<name>.png``. Unreadable or
unsupported files go to ``errors.csv`` and the run goes on. Rows are appended and flushed per
batch, images are written atomically, and a rerun skips images already in ``predictions.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.bundle import Bundle, BundleOutput
from scans.io import confined, write_png
from scans.readers import ReadError, is_supported, read_image, resize_image, resize_mask
from scans.runtime import Stopwatch

PRED_FIELDS = [
    "file",
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
]
ERR_FIELDS = ["file", "reason"]


def _files(folder: Path, recursive: bool, skip: Path) -> Iterator[Path]:
    """Input files, never the output folder's own files (it may sit inside the input folder)."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    for p in sorted(it):
        r = p.resolve()
        if p.is_file() and skip not in r.parents and r != skip:
            yield p


def _stem(folder: Path, path: Path) -> str:
    """A flat, unique output name for an input file, safe inside the output folder."""
    rel = path.relative_to(folder).as_posix()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in rel.replace("/", "__"))
    digest = hashlib.sha1(rel.encode()).hexdigest()[:6]
    return f"{safe[:100]}-{digest}"


def _done(path: Path, key: str = "file") -> set[str]:
    if not path.is_file():
        return set()
    with open(path, newline="") as fh:
        return {row[key] for row in csv.DictReader(fh) if row.get(key)}


def _drop_torn_tail(path: Path) -> None:
    """A kill during an append can leave half a row: cut the file back to its last newline."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


class _CsvAppender:
    def __init__(self, path: Path, fields: list[str]) -> None:
        new = not path.is_file() or path.stat().st_size == 0
        self.fh = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=fields)
        if new:
            self.writer.writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.writer.writerows(rows)
        self.fh.flush()
        os.fsync(self.fh.fileno())  # a killed run keeps every row written so far

    def close(self) -> None:
        self.fh.close()


def overlay(
    image: np.ndarray, box: tuple[float, float, float, float], mask: np.ndarray, heat: np.ndarray
) -> np.ndarray:
    """BGR uint8: the scan, a heat map of the anomaly map inside the box, the mask contour and the box."""
    gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    h = heat.astype(np.float32)
    span = float(h.max() - h.min())
    h8 = ((h - h.min()) / span * 255).astype(np.uint8) if span > 0 else np.zeros_like(gray)
    colored = cv2.applyColorMap(h8, cv2.COLORMAP_JET)
    out = cv2.addWeighted(base, 0.65, colored, 0.35, 0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 255, 255), 1)
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), (0, 255, 0), 1)
    return out


@dataclass
class _Batch:
    """The readable scans of one batch (originals and model-size copies) and the rows of the others."""

    files: list[Path] = field(default_factory=list)
    originals: list[np.ndarray] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def _read_batch(folder: Path, chunk: list[Path], size: int, frame: int) -> _Batch:
    """Read every file of ``chunk``; an unsupported or unreadable one becomes an error row."""
    batch = _Batch()
    for p in chunk:
        rel = p.relative_to(folder).as_posix()
        if not is_supported(p):
            batch.errors.append({"file": rel, "reason": f"unsupported file type '{p.suffix or '(none)'}'"})
            continue
        try:
            img = read_image(p, frame=frame)
            if not np.isfinite(img).all():
                raise ReadError(p, "image holds NaN or infinite pixel values")
        except ReadError as exc:
            batch.errors.append({"file": rel, "reason": exc.reason})
            continue
        except Exception as exc:  # one odd file (permissions, a codec error) must not stop the batch
            batch.errors.append({"file": rel, "reason": f"{exc.__class__.__name__}: {exc}"})
            continue
        batch.files.append(p)
        batch.originals.append(img)
        batch.images.append(resize_image(img, size))
    return batch


def _write_outputs(
    folder: Path, out: Path, bundle: Bundle, batch: _Batch, result: BundleOutput
) -> list[dict[str, Any]]:
    """Mask and overlay PNGs of every scan of ``batch``, in the scan's own pixels; returns its CSV rows."""
    size, rows = bundle.image_size, []
    for i, p in enumerate(batch.files):
        stem = _stem(folder, p)
        mask_rel, ov_rel = f"masks/{stem}.png", f"overlays/{stem}.png"
        orig = batch.originals[i]
        h, w = orig.shape
        # outputs are in the scan's own pixels, not the model's square grid
        sx, sy = w / size, h / size
        b = result.boxes[i]
        x1, y1, x2, y2 = b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy
        mask = resize_mask(result.masks[i], (w, h))
        heat = cv2.resize(result.heat[i], (w, h), interpolation=cv2.INTER_LINEAR)
        write_png(confined(out, mask_rel), mask.astype(np.uint8) * 255)
        write_png(confined(out, ov_rel), overlay(orig, (x1, y1, x2, y2), mask, heat))
        score = result.scores[i]
        rows.append(
            {
                "file": p.relative_to(folder).as_posix(),
                "score": f"{score:.6g}",
                "verdict": "distended" if score >= bundle.score_threshold else "not distended",
                "threshold": f"{bundle.score_threshold:.6g}",
                **{k: f"{v:.1f}" for k, v in zip(("box_x1", "box_y1", "box_x2", "box_y2"), (x1, y1, x2, y2))},
                "box_source": result.sources[i],
                "box_confidence": f"{result.confidences[i]:.4f}",
                "mask": mask_rel,
                "overlay": ov_rel,
                "width": w,
                "height": h,
            }
        )
    return rows


def _pending(folder: Path, out: Path, recursive: bool) -> tuple[list[Path], set[str]]:
    """The input files still to process, and those a killed run already finished."""
    pred_csv, err_csv = confined(out, "predictions.csv"), confined(out, "errors.csv")
    _drop_torn_tail(pred_csv)
    _drop_torn_tail(err_csv)
    done = _done(pred_csv) | _done(err_csv)
    files = [p for p in _files(folder, recursive, out.resolve()) if p.relative_to(folder).as_posix() not in done]
    return files, done


def predict_folder(
    bundle_dir: Path,
    folder: Path,
    out: Path,
    recursive: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Process every file of ``folder``; returns counts and throughput. Resumes a killed run."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found")
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.load(Path(bundle_dir), device=device)
    files, done = _pending(folder, out, recursive)
    preds = _CsvAppender(confined(out, "predictions.csv"), PRED_FIELDS)
    errs = _CsvAppender(confined(out, "errors.csv"), ERR_FIELDS)
    n_ok = n_err = 0
    watch = Stopwatch()
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    try:
        with watch("predict"):
            for start in range(0, len(files), batch_size):
                chunk = files[start : start + batch_size]
                batch = _read_batch(folder, chunk, bundle.image_size, bundle.frame)
                rows = (
                    _write_outputs(folder, out, bundle, batch, bundle.process(np.stack(batch.images)))
                    if batch.files
                    else []
                )
                # predictions first: a kill between the two writes never loses a processed image
                preds.write(rows)
                errs.write(batch.errors)
                n_ok, n_err = n_ok + len(rows), n_err + len(batch.errors)
                bar.update(len(chunk))
    finally:
        bar.close()
        preds.close()
        errs.close()
    return _report(watch.seconds["predict"], n_ok, n_err, len(done), confined(out, "errors.csv"))


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
