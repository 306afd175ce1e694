"""``train``: one deployable bundle from all the data, its thresholds chosen on a patient-grouped
validation part (:func:`train_bundle`).

The bundle folder holds ``bundle.json`` (:class:`pipeline.serve.bundle_file.BundleDoc`: thresholds, the
score's calibration, prior policy, config, versions), ``detector/`` and ``unet/``. Nothing in it is a
pickle: weights load with ``weights_only=True``. The verdict is the image score against
``score.threshold``; ``calibration`` (:func:`pipeline.shared.calibration.fit_calibration`, fitted on the
same validation part) turns the score into the probability of distension that ``predict`` writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detectors.base import Detector, detector_class
from detectors.prior import PriorPolicy
from pipeline import registry
from pipeline.config import Config
from pipeline.provenance import git_commit, package_versions
from pipeline.run_dirs import RunDirError, run_lock
from pipeline.serve.bundle_file import (
    BUNDLE_FORMAT,
    BundleDoc,
    PriorSpec,
    ScoreSpec,
    SegmentationSpec,
    read_bundle_doc,
    write_bundle_doc,
)
from pipeline.shared.calibration import fit_calibration
from pipeline.shared.data import Data, load_data
from pipeline.shared.models import fit_detector, fit_unet
from pipeline.shared.priors import Expansion, fold_policy, predict_priors
from pipeline.shared.scoring import image_scores
from runtime.device import resolve_device, set_threads
from runtime.distributed import barrier, distributed_session, is_main, main_first
from scans.folds import make_folds
from scans.records import ScanArrays

# Below these on the validation part a bundle is still written, with a warning on stderr and in bundle.json.
MIN_VALIDATION_AUROC = 0.5
MIN_VALIDATION_SENSITIVITY = 0.5


def operating_threshold(
    scores: np.ndarray, labels: np.ndarray, point: str = "youden", sensitivity: float = 0.9
) -> tuple[float, dict[str, float]]:
    """Image-score threshold on validation: Youden's J, or the highest one reaching ``sensitivity``.

    >>> operating_threshold(np.array([0.1, 0.2, 0.6, 0.9]), np.array([0, 0, 1, 1]))[0]
    0.6
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(labels, scores)
    if point == "youden":
        i = int(np.argmax(tpr - fpr))
    elif point == "sensitivity":
        reach = np.flatnonzero(tpr >= sensitivity)
        i = int(reach[0])
    else:
        raise ValueError(f"bundle.operating_point must be youden or sensitivity, not {point!r}")
    t = float(thr[i]) if np.isfinite(thr[i]) else float(np.max(scores))
    return t, {"sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i])}


def _validation_split(data: Data, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices: a patient-grouped ~20% held out for the thresholds."""
    val_ids = make_folds(data.scans, k=5, seed=seed)[0].test
    val_set = set(val_ids)
    train_ids = tuple(s.id for s in data.scans if s.id not in val_set)
    return data.index(train_ids), data.index(val_ids)


def train_bundle(cfg: Config, model_dir: Path) -> BundleDoc:
    """Train one deployable model on all the data, with a patient-grouped validation part (under torchrun,
    every rank trains and rank 0 writes); returns the ``bundle.json`` written."""
    if detector_class(cfg.detector.name).ground_truth:
        raise ValueError(
            "a deployable bundle needs a detector for new scans: use --detector " + " or ".join(registry.trainable())
        )
    model_dir = Path(model_dir)
    check_bundle_out(model_dir)
    with distributed_session(cfg.device):  # a no-op without torchrun
        # rank 0 holds <out>/.lock while it trains and writes (as `run` does its run folder): a second
        # `train --out` into the same folder refuses at once, before it loads, trains or writes anything
        with run_lock(model_dir, check_bundle_out) if is_main() else contextlib.nullcontext():
            set_threads(cfg.threads)
            data = main_first(lambda: load_data(cfg))
            tr, va = _validation_split(data, cfg.seed)
            det, det_info = fit_detector(cfg, data, tr, va, model_dir / "work" / "detector")  # every rank
            unet, unet_info = fit_unet(cfg, data, tr, va, "single")
            if is_main():
                _write_bundle(cfg, model_dir, data, (tr, va), (det, det_info), (unet, unet_info))
            barrier()
            doc = read_bundle_doc(model_dir, checked=False)  # as written: predict checks its values
    return doc


def check_bundle_out(out: Path) -> None:
    """Refuse a ``train --out`` that is a file, already holds a bundle or is a run folder."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is an existing file, not a folder; choose another --out")
    if (out / "bundle.json").exists():
        raise FileExistsError(f"{out} already holds a bundle; choose another --out")
    if (out / "config.yaml").is_file() or (out / "summary.json").exists():
        raise RunDirError(f"{out} is a LoRIS run folder, not a bundle folder; choose another --out")


def bundle_warnings(validation: dict[str, Any]) -> list[str]:
    """Why a bundle is unfit for use, from its validation figures: an I-AUROC below chance or undefined,
    or a sensitivity below one half at its operating point.

    >>> bundle_warnings({"i_auroc": 0.9, "sensitivity": 0.8})
    []
    >>> len(bundle_warnings({"i_auroc": 0.119, "sensitivity": 0.0}))
    2
    """
    out = []
    auroc = float(validation.get("i_auroc", math.nan))
    if not auroc >= MIN_VALIDATION_AUROC:  # NaN too: one class only, nothing was measured
        out.append(
            f"validation I-AUROC {auroc:.3f} is below {MIN_VALIDATION_AUROC} (chance): its scores do not rank "
            f"distended scans above normal ones"
        )
    sensitivity = float(validation.get("sensitivity", math.nan))
    if not sensitivity >= MIN_VALIDATION_SENSITIVITY:
        out.append(
            f"validation sensitivity {sensitivity:.2f} at the score threshold is below "
            f"{MIN_VALIDATION_SENSITIVITY}: it would miss most distended scans"
        )
    return out


def _write_bundle(
    cfg: Config, model_dir: Path, data: Data, split: tuple[Any, Any], det: tuple[Detector, dict], unet: tuple[Any, dict]
) -> None:
    """Choose the operating points on the validation part and write the bundle (rank 0)."""
    from reconstruction.checkpoint import save_model

    (tr, va), (detector, det_info), (net, unet_info) = split, det, unet
    d = cfg.detector
    policy = fold_policy(data.arrays, tr, d.threshold, d.train_classes)
    thresholds = _thresholds(cfg, detector, net, policy, data.arrays.subset(va))
    detector.save(model_dir / "detector")
    save_model(net, model_dir / "unet", meta={k: v for k, v in unet_info.items() if k != "cache"})
    warnings = tuple(bundle_warnings(thresholds.operating))
    cal = thresholds.calibration
    if cal is not None and cal.get("method") != "platt":
        print(
            f"WARNING: no calibration in the bundle written to {model_dir}: {cal.get('reason')}; "
            "predict leaves predictions.csv's probability column empty",
            file=sys.stderr,
        )
    doc = dataclasses.replace(
        new_bundle_doc(cfg, policy, thresholds),
        warnings=warnings,
        train={"n_train": len(tr), "n_val": len(va), "detector": det_info, "unet": unet_info},
        config=cfg.to_dict(),
        versions=package_versions(),
        commit=git_commit(),
    )
    write_bundle_doc(model_dir, doc)
    if warnings:
        lines = "\n".join(f"WARNING:   - {w}" for w in warnings)
        print(
            f"WARNING: the bundle written to {model_dir} is unfit for use (bundle.json 'warnings'):\n{lines}\n"
            f"WARNING: train with more data, epochs or another detector before deploying it",
            file=sys.stderr,
        )


@dataclass(frozen=True)
class Thresholds:
    """The bundle's operating points, chosen on validation scans."""

    score: float
    operating: dict[str, float]  # validation sensitivity, specificity, I-AUROC and counts
    segmentation: float
    dice: float
    calibration: dict[str, Any] | None = None  # fit_calibration's; None: bundle.json has no calibration


def _thresholds(cfg: Config, det: Detector, unet: Any, policy: PriorPolicy, val: ScanArrays) -> Thresholds:
    """Score and segmentation thresholds on the validation scans."""
    from evaluation.metrics import image_auroc, select_threshold
    from reconstruction.infer import reconstruct

    b = cfg.bundle
    expansion = Expansion(cfg.detector.expand_up, cfg.detector.expand_side)
    pv = predict_priors(det, val, policy, expansion)
    maps = tuple(dict.fromkeys([b.score_map, b.segment_map]))
    margin = cfg.unet.mask_margin
    rv = reconstruct(unet, val.images, pv.boxes, maps=maps, device=resolve_device(cfg.device), margin=margin)
    scores = image_scores({b.score_map: rv.maps[b.score_map]}, pv.boxes, cfg.score, margin)[b.score_map]
    thr, op = operating_threshold(scores, val.labels, b.operating_point, b.sensitivity)
    seg = select_threshold(rv.maps[b.segment_map], val.masks, kernel=cfg.evaluation.postprocess_kernel)
    validation = {**op, "i_auroc": image_auroc(scores, val.labels), "n": len(val), "n_distended": int(val.labels.sum())}
    return Thresholds(thr, validation, seg.threshold, seg.dice, fit_calibration(scores, val.labels))


def new_bundle_doc(cfg: Config, policy: PriorPolicy, t: Thresholds) -> BundleDoc:
    """``bundle.json`` without its training record and provenance."""
    b, s, d = cfg.bundle, cfg.score, cfg.detector
    return BundleDoc(
        format=BUNDLE_FORMAT,
        detector=d.name,
        image_size=cfg.image_size,
        maps=tuple(dict.fromkeys([b.score_map, b.segment_map])),
        frame=cfg.frame,
        mask_margin=cfg.unet.mask_margin,
        score=ScoreSpec(
            map=b.score_map,
            threshold=t.score,
            operating_point=b.operating_point,
            pooling=s.pooling,
            region=s.region,
            topk_fraction=s.topk_fraction,
            inset=s.inset,
            validation=t.operating,
        ),
        calibration=None if t.calibration is None else dict(t.calibration),
        segmentation=SegmentationSpec(
            map=b.segment_map,
            threshold=t.segmentation,
            validation_dice=t.dice,
            kernel=cfg.evaluation.postprocess_kernel,
        ),
        prior=PriorSpec(
            threshold=policy.threshold,
            median_box=policy.median_box,
            expand_up=d.expand_up,
            expand_side=d.expand_side,
        ),
    )


def bundle_doc(cfg: Config, policy: PriorPolicy, t: Thresholds) -> dict[str, Any]:
    """:func:`new_bundle_doc` as the JSON object ``train`` writes (before its record and provenance).

    >>> from pipeline.config import load_config
    >>> policy, t = PriorPolicy(0.05, (4.0, 8.0, 28.0, 16.0)), Thresholds(0.1, {}, 0.05, 0.0)
    >>> doc = bundle_doc(load_config(None, "quick"), policy, t)
    >>> list(doc)
    ['format', 'detector', 'image_size', 'maps', 'frame', 'mask_margin', 'score', 'segmentation', 'prior']
    """
    return new_bundle_doc(cfg, policy, t).to_dict()
