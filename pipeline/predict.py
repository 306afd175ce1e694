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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.bundle import Bundle
from scans.io import confined, write_png
from scans.readers import ReadError, is_supported, read_image, resize_image

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


def resize_mask(mask: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), wh, interpolation=cv2.INTER_NEAREST).astype(bool)


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
    pred_csv, err_csv = confined(out, "predictions.csv"), confined(out, "errors.csv")
    _drop_torn_tail(pred_csv)
    _drop_torn_tail(err_csv)
    done = _done(pred_csv) | _done(err_csv)
    files = [p for p in _files(folder, recursive, out.resolve()) if p.relative_to(folder).as_posix() not in done]
    preds, errs = _CsvAppender(pred_csv, PRED_FIELDS), _CsvAppender(err_csv, ERR_FIELDS)
    size = bundle.image_size
    n_ok = n_err = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images, originals, kept, err_rows = [], [], [], []
            for p in chunk:
                rel = p.relative_to(folder).as_posix()
                if not is_supported(p):
                    err_rows.append({"file": rel, "reason": f"unsupported file type '{p.suffix or '(none)'}'"})
                    continue
                try:
                    img = read_image(p, frame=bundle.frame)
                    if not np.isfinite(img).all():
                        raise ReadError(p, "image holds NaN or infinite pixel values")
                except ReadError as exc:
                    err_rows.append({"file": rel, "reason": exc.reason})
                    continue
                except Exception as exc:  # one odd file (permissions, a codec error) must not stop the batch
                    err_rows.append({"file": rel, "reason": f"{exc.__class__.__name__}: {exc}"})
                    continue
                originals.append(img)
                images.append(resize_image(img, size))
                kept.append(p)
            rows = []
            if kept:
                result = bundle.process(np.stack(images))
                for i, p in enumerate(kept):
                    rel = p.relative_to(folder).as_posix()
                    stem = _stem(folder, p)
                    mask_rel, ov_rel = f"masks/{stem}.png", f"overlays/{stem}.png"
                    orig = originals[i]
                    h, w = orig.shape
                    # outputs are in the scan's own pixels, not the model's square grid
                    sx, sy = w / size, h / size
                    x1, y1, x2, y2 = (
                        result.boxes[i][0] * sx,
                        result.boxes[i][1] * sy,
                        result.boxes[i][2] * sx,
                        result.boxes[i][3] * sy,
                    )
                    mask = resize_mask(result.masks[i], (w, h))
                    heat = cv2.resize(result.heat[i], (w, h), interpolation=cv2.INTER_LINEAR)
                    write_png(confined(out, mask_rel), mask.astype(np.uint8) * 255)
                    write_png(confined(out, ov_rel), overlay(orig, (x1, y1, x2, y2), mask, heat))
                    rows.append(
                        {
                            "file": rel,
                            "score": f"{result.scores[i]:.6g}",
                            "verdict": "distended" if result.scores[i] >= bundle.score_threshold else "not distended",
                            "threshold": f"{bundle.score_threshold:.6g}",
                            "box_x1": f"{x1:.1f}",
                            "box_y1": f"{y1:.1f}",
                            "box_x2": f"{x2:.1f}",
                            "box_y2": f"{y2:.1f}",
                            "box_source": result.sources[i],
                            "box_confidence": f"{result.confidences[i]:.4f}",
                            "mask": mask_rel,
                            "overlay": ov_rel,
                            "width": w,
                            "height": h,
                        }
                    )
            # predictions first: a kill between the two writes never loses a processed image
            preds.write(rows)
            errs.write(err_rows)
            n_ok += len(rows)
            n_err += len(err_rows)
            bar.update(len(chunk))
    finally:
        bar.close()
        preds.close()
        errs.close()
    elapsed = time.perf_counter() - t0
    stats = {
        "processed": n_ok,
        "errors": n_err,
        "skipped_already_done": len(done),
        "seconds": elapsed,
        "images_per_s": n_ok / elapsed if elapsed > 0 and n_ok else 0.0,
    }
    print(
        f"predict: {n_ok} image(s) in {elapsed:.1f} s ({stats['images_per_s']:.2f} images/s), "
        f"{n_err} error(s) in {err_csv}, {len(done)} already done",
        file=sys.stderr,
    )
    return stats
