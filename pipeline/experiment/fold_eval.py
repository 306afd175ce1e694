"""Evaluating one prior source on one set of scans: priors, reconstructions, maps, scores, metrics,
prior-only controls, bootstrap replicates and per-image rows (docs/design.md, "Metrics").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from detectors.base import Detector
from detectors.prior import PriorPolicy
from evaluation.bootstrap import detection_matches, detection_replicates
from evaluation.controls import CONTROLS, box_indicator, control_scores
from evaluation.detection import detection_metrics, write_coco_results
from evaluation.figures import Example, select_cases
from evaluation.intervals import row_replicates
from evaluation.metrics import per_image_dice, segmentation_metrics
from evaluation.rescoring import SCORE, VAL_SCORE, pooled_row
from evaluation.results import FoldResult, ImageRow
from pipeline.config import Config, ScoreConfig
from pipeline.shared.priors import Expansion, Priors, predict_priors
from pipeline.shared.scoring import image_scores
from runtime.device import resolve_device
from runtime.timing import Stopwatch
from scans.records import ScanArrays, box_iou

if TYPE_CHECKING:
    from reconstruction.infer import Reconstruction

Metrics = dict[str, dict[str, float]]


@dataclass(frozen=True)
class EvalSettings:
    """What scoring and evaluation read from the config, resolved once."""

    maps: tuple[str, ...]
    score: ScoreConfig
    margin: float  # unet.mask_margin: the masked pixels around the box
    kernel: int  # evaluation.postprocess_kernel
    max_exact_pixels: int
    expansion: Expansion
    device: str

    @classmethod
    def of(cls, cfg: Config) -> EvalSettings:
        ev = cfg.evaluation
        expansion = Expansion(cfg.detector.expand_up, cfg.detector.expand_side)
        return cls(
            cfg.maps,
            cfg.score,
            cfg.unet.mask_margin,
            ev.postprocess_kernel,
            ev.exact_pauroc_max_pixels,
            expansion,
            resolve_device(cfg.device),
        )


@dataclass(frozen=True)
class Source:
    """One prior source of a fold, ready to predict; ``main`` marks Table 1's source."""

    name: str
    detector: Detector
    policy: PriorPolicy
    main: bool


@dataclass(frozen=True)
class Validation:
    """A fold's validation scans and their maps (controls included): every Dice threshold comes from here;
    ``boxes``, the priors the maps were made in, pool the validation scores the calibration is fitted on."""

    arrays: ScanArrays
    maps: dict[str, np.ndarray]
    boxes: np.ndarray | None = None


@dataclass
class Part:
    """What one prior source gave on one evaluated set (the fold's test part or a held-out set)."""

    priors: Priors
    recon: Reconstruction
    scores: dict[str, np.ndarray]
    metrics: Metrics
    control_scores: dict[str, np.ndarray]
    controls: Metrics
    dice: dict[str, np.ndarray]
    detection: dict[str, Any] | None
    seconds: float
    replicates: dict[str, np.ndarray]


def control_maps(boxes: np.ndarray, size: int, margin: float) -> dict[str, np.ndarray]:
    """The box-indicator map of every prior-only control (one array, shared)."""
    ind = box_indicator(boxes, size, size, margin)
    return {c: ind for c in CONTROLS}


def method_metrics(
    ev: EvalSettings,
    scores: dict[str, np.ndarray],
    maps: dict[str, np.ndarray],
    arrays: ScanArrays,
    validation: Validation,
) -> Metrics:
    """Segmentation and detection metrics of every map, thresholds from the validation maps."""
    val = validation.arrays
    return {
        name: segmentation_metrics(
            scores[name],
            arrays.labels,
            maps[name],
            arrays.masks,
            validation.maps[name],
            val.masks,
            kernel=ev.kernel,
            max_exact_pixels=ev.max_exact_pixels,
        )
        for name in maps
    }


def priors_and_maps(ev: EvalSettings, unet: Any, source: Source, arrays: ScanArrays) -> tuple[Priors, Reconstruction]:
    """The source's priors on ``arrays`` and the U-Net's reconstructions and maps inside them."""
    from reconstruction.infer import reconstruct

    pri = predict_priors(source.detector, arrays, source.policy, ev.expansion)
    rec = reconstruct(unet, arrays.images, pri.boxes, maps=ev.maps, device=ev.device, margin=ev.margin)
    return pri, rec


def validation_of(ev: EvalSettings, unet: Any, source: Source, val: ScanArrays) -> Validation:
    """The validation maps of ``source`` (its reconstructions' maps and the controls' box maps)."""
    pri, rec = priors_and_maps(ev, unet, source, val)
    return Validation(val, {**rec.maps, **control_maps(pri.boxes, val.images.shape[-1], ev.margin)}, pri.boxes)


def per_image_scores(
    ev: EvalSettings,
    maps: dict[str, np.ndarray],
    boxes: np.ndarray,
    scores: dict[str, np.ndarray],
    validation: Validation,
    src: str,
) -> dict[str, np.ndarray]:
    """Every map's image scores under both pooling rules, on this part (``<src>/<row>/score``) and on the
    validation part (``<src>/<row>/val_score``); ``<row>`` is the map (``score.region``) or
    ``<map>@<other region>``. ``compare`` rescores and calibrates from them without a second inference."""
    other: Literal["image", "box"] = "image" if ev.score.region == "box" else "box"
    rows = {name: (name, pooled_row(name, other)) for name in maps}
    alt = image_scores(maps, boxes, ev.score, ev.margin, region=other)
    out: dict[str, np.ndarray] = {}
    for name, (own, moved) in rows.items():
        out[f"{src}/{own}/{SCORE}"] = np.asarray(scores[name], np.float64)
        out[f"{src}/{moved}/{SCORE}"] = np.asarray(alt[name], np.float64)
    if validation.boxes is None:  # a Validation made without its priors: nothing to calibrate on
        return out
    val_maps = {n: validation.maps[n] for n in maps}
    for region, i in ((ev.score.region, 0), (other, 1)):
        pooled = image_scores(val_maps, validation.boxes, ev.score, ev.margin, region=region)
        out.update({f"{src}/{rows[n][i]}/{VAL_SCORE}": np.asarray(v, np.float64) for n, v in pooled.items()})
    return out


def evaluate_part(
    ev: EvalSettings, unet: Any, source: Source, arrays: ScanArrays, validation: Validation, weights: np.ndarray
) -> Part:
    """Evaluate ``source`` on ``arrays``; ``weights`` are the set's patient-cluster bootstrap weights."""
    watch = Stopwatch()
    with watch("inference"):  # detection, refinement, reconstruction, maps
        pri, rec = priors_and_maps(ev, unet, source, arrays)
    scores = image_scores(rec.maps, pri.boxes, ev.score, ev.margin)
    metrics = method_metrics(ev, scores, rec.maps, arrays, validation)
    ctrl_maps = control_maps(pri.boxes, arrays.images.shape[-1], ev.margin)
    ctrl_scores = control_scores(pri.boxes)
    controls = method_metrics(ev, ctrl_scores, ctrl_maps, arrays, validation)
    dice = {
        name: per_image_dice(rec.maps[name], arrays.masks, metrics[name]["dice_val_threshold"], kernel=ev.kernel)
        for name in rec.maps
    }
    # Table 1's source gets replicates of every map; the others of LoRIS+MSGMSD and the controls
    names = list(rec.maps) if source.main else [m for m in rec.maps if m == "msgmsd"]
    reps: dict[str, np.ndarray] = {}
    for name, maps, s, m in [(n, rec.maps, scores, metrics) for n in names] + [
        (c, ctrl_maps, ctrl_scores, controls) for c in CONTROLS
    ]:
        reps.update(
            row_replicates(
                source.name, name, m[name], s[name], arrays.labels, maps[name], arrays.masks, weights, ev.kernel
            )
        )
    detection = None
    if not pri.ground_truth:
        detection, det_reps = _detection(source.name, arrays, pri, weights)
        reps.update(det_reps)
    if source.main:  # kept beside the replicates (after them: the first entry gives the replicate count)
        reps.update(per_image_scores(ev, rec.maps, pri.boxes, scores, validation, source.name))
    return Part(pri, rec, scores, metrics, ctrl_scores, controls, dice, detection, watch.seconds["inference"], reps)


def _detection(
    src: str, arrays: ScanArrays, pri: Priors, weights: np.ndarray
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Detection metrics of a trained detector's raw detections, and their bootstrap replicates."""
    preds = [(d.boxes, d.scores) for d in pri.detections]
    out = detection_metrics(arrays.boxes, arrays.ids, preds, arrays.images.shape[1:], labels=arrays.labels)
    out["fallbacks"] = pri.fallbacks
    reps = detection_replicates(detection_matches(arrays.boxes, preds), weights)
    return out, {f"{src}/detection/{k}": v.astype(np.float32) for k, v in reps.items()}


def record_part(result: FoldResult, src: str, fold: int, arrays: ScanArrays, part: Part) -> None:
    """Add ``part`` (source ``src`` on ``arrays``) to ``result``: its metrics and one row per image."""
    result.controls[src] = part.controls
    result.priors[src] = part.metrics["msgmsd"] if "msgmsd" in part.metrics else next(iter(part.metrics.values()))
    if part.detection is not None:
        result.detection[src] = part.detection
    pri, scores = part.priors, {**part.scores, **part.control_scores}
    for i in range(len(arrays)):
        result.rows.append(
            ImageRow(
                id=int(arrays.ids[i]),
                patient=arrays.patients[i],
                fold=fold,
                label=int(arrays.labels[i]),
                prior_source=src,
                box=_box(pri.boxes[i]),
                iou=1.0 if pri.ground_truth else box_iou(pri.raw_boxes[i], arrays.boxes[i]),
                scores={k: float(v[i]) for k, v in scores.items()},
                dice={k: float(v[i]) for k, v in part.dice.items()},
                fallback=pri.sources[i] == "fallback",
            )
        )


def _box(b: np.ndarray) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in b)
    return x1, y1, x2, y2


def write_predictions(coco_dir: Path, arrays: ScanArrays, pri: Priors) -> None:
    """The raw detections as a COCO results file; it pairs with annotations.json, so boxes go back to
    the scans' own pixels."""
    inv = np.concatenate([1 / arrays.scale, 1 / arrays.scale], axis=1)
    preds = [(d.boxes * inv[i], d.scores) for i, d in enumerate(pri.detections)]
    write_coco_results(coco_dir / "test_predictions.coco.json", arrays.ids, preds)


def fold_examples(fold: int, test: ScanArrays, part: Part, kernel: int) -> list[Example]:
    """The figure cases of a fold (best, worst, ... by Dice) on its DD map (else the first map)."""
    from reconstruction.segment import segment

    maps = part.recon.maps
    method = "dd" if "dd" in maps else next(iter(maps))
    threshold = part.metrics[method]["dice_val_threshold"]
    dice, scores = part.dice[method], part.scores[method]
    out = []
    for img_id, label, case in select_cases(test.ids.tolist(), test.labels.tolist(), dice.tolist(), scores.tolist()):
        i = int(np.flatnonzero(test.ids == img_id)[0])
        out.append(
            Example(
                id=img_id,
                label=label,
                case=f"{case} (fold {fold})",
                image=test.images[i],
                reconstruction=part.recon.recon[i],
                anomaly_map=maps[method][i],
                gt_mask=test.masks[i],
                pred_mask=segment(maps[method][i], threshold, kernel=kernel),
                dice=float(dice[i]),
                score=float(scores[i]),
                method=method,
            )
        )
    return out
