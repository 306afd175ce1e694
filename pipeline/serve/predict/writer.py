"""What ``predict`` writes per frame: the model's box, mask and heat map mapped back through the crop to
the scan's own pixels, the ``predictions.csv`` row (mask as RLE), the ``overlays/`` PNG and the DICOM
results (:mod:`pipeline.serve.dicom_out`); and the :class:`Sink` that appends a run's rows to
``predictions.csv`` and ``errors.csv``. No patient tag reaches the CSV or PNG outputs."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.serve.bundle import Bundle, BundleOutput
from pipeline.serve.predict.csv_rows import (
    CROP_FIELDS,
    ERR_FIELDS,
    PRED_FIELDS,
    CsvAppender,
    csv_name,
    error_row,
    probability_cell,
    reason_of,
    safe_cell,
)
from pipeline.serve.predict.inputs import Batch, Item
from pipeline.serve.predict.options import Outputs, ReadOptions
from runtime.io import confined, write_png
from scans.coco import encode_mask
from scans.readers import Crop, CropMode, ReadResult, is_dicom, read_scan, resize_mask


def _stem(folder: Path, path: Path, frame: int | None = None) -> str:
    """A flat, unique output name for an input file (and frame), safe inside the output folder."""
    rel = path.relative_to(folder).as_posix()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in rel.replace("/", "__"))
    digest = hashlib.sha1(os.fsencode(rel)).hexdigest()[:6]  # the name's bytes, UTF-8 or not
    return f"{safe[:100]}-{digest}" + (f"-f{frame}" if frame is not None else "")


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
class _Mapped:
    """One prediction in the scan's own pixels (and its overlay, when one is drawn)."""

    box: tuple[float, float, float, float]
    mask: np.ndarray
    overlay: np.ndarray | None


def _to_original(
    rr: ReadResult, item: Item, crop: CropMode, size: int, result: BundleOutput, i: int, draw: bool
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
    item: Item, stem: str, out: Path, bundle: Bundle, m: _Mapped, score: float, source: str, kinds: Sequence[str]
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


def write_outputs(
    folder: Path,
    out: Path,
    bundle: Bundle,
    batch: Batch,
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
                errors.append(error_row(item.rel, f"dicom-out: {reason_of(exc)}", item.frame, rr.sop_instance_uid))
        rows.append(_row(item, rr, m, bundle.score_threshold, result, i) | {"overlay": ov_rel, "dicom": dicom})
    return rows, errors


def _row(item: Item, rr: ReadResult, m: _Mapped, threshold: float, result: BundleOutput, i: int) -> dict[str, Any]:
    """The ``predictions.csv`` row of frame ``i`` of a batch, less its ``overlay`` and ``dicom`` cells."""
    score = float(result.scores[i])
    w, h = rr.original_size
    return {
        "file": csv_name(item.rel),
        "frame": item.frame,
        "sop_instance_uid": safe_cell(rr.sop_instance_uid or ""),
        "score": f"{score:.6g}",
        "probability": probability_cell(float(result.probabilities[i])),
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


class Sink:
    """``predictions.csv`` and ``errors.csv`` appenders, the counts and the progress bar of one run."""

    def __init__(self, out: Path, progress: bool, total: int | None) -> None:
        self.out = out
        self.preds = CsvAppender(confined(out, "predictions.csv"), PRED_FIELDS)
        self.errs = CsvAppender(confined(out, "errors.csv"), ERR_FIELDS)
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
