"""One fold of a run: fit the U-Net, fit and evaluate every prior source, then the RIAD baseline.

A fold's output is saved as soon as it is done (``folds/<k>/fold.json`` last), so a killed run
resumes at the next fold (:func:`load_fold`).

Under ``torchrun`` every rank fits the fold's models together (:mod:`pipeline.shared.models`); rank 0 alone
evaluates them while the others go on to the next fit and wait for it there.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.aggregate import RIAD, json_safe
from evaluation.figures import Example
from evaluation.intervals import NO_PRIOR, fold_weights, row_replicates
from evaluation.results import FoldResult
from pipeline import registry
from pipeline.config import Config
from pipeline.experiment.fold_eval import (
    EvalSettings,
    Source,
    Validation,
    evaluate_part,
    fold_examples,
    method_metrics,
    record_part,
    validation_of,
    write_predictions,
)
from pipeline.run_dirs import write_json
from pipeline.shared.data import Data
from pipeline.shared.models import fit_detector, fit_unet
from pipeline.shared.priors import fold_policy
from pipeline.shared.scoring import image_scores
from runtime.distributed import is_main
from runtime.io import atomic_write
from runtime.timing import Stopwatch
from scans.records import ScanArrays

EXAMPLE_ARRAYS = ("image", "reconstruction", "anomaly_map", "gt_mask", "pred_mask")


class Progress:
    """One bar over all (fold, stage) steps, showing fold, stage and ETA."""

    def __init__(self, n_folds: int, stages_per_fold: int, enabled: bool = True) -> None:
        self.bar = tqdm(
            total=n_folds * stages_per_fold,
            desc="run",
            unit="stage",
            file=sys.stderr,
            disable=not enabled,
            position=0,
            dynamic_ncols=True,
        )

    def stage(self, fold: int, name: str) -> None:
        self.bar.set_description(f"fold {fold} · {name}")
        self.bar.refresh()

    def done(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def stages_per_fold(names: Sequence[str], riad: bool) -> int:
    """Progress steps of one fold: the U-Net, each source's maps, each trained detector, RIAD."""
    return 1 + len(names) + sum(not registry.is_ground_truth(n) for n in names) + int(riad)


@dataclass
class External:
    """The fold's models on one held-out set: its result, replicates, scans and bootstrap weights."""

    result: FoldResult
    replicates: dict[str, np.ndarray] = field(default_factory=dict)
    arrays: ScanArrays | None = None
    weights: np.ndarray | None = None


@dataclass
class FoldOutput:
    """One fold's results: the test part, its examples, timings and infos, its bootstrap
    replicates, and per held-out set the same models' result and replicates."""

    result: FoldResult
    examples: list[Example] = field(default_factory=list)
    timing: dict[str, float] = field(
        default_factory=lambda: {"detector_fit_s": 0.0, "unet_fit_s": 0.0, "inference_s": 0.0, "inference_images": 0}
    )
    info: dict[str, Any] = field(default_factory=dict)
    replicates: dict[str, np.ndarray] = field(default_factory=dict)
    external: list[External] = field(default_factory=list)

    def add_fit(self, kind: str, info: dict[str, Any]) -> None:
        """Count a model's training time (``kind``: ``detector_fit_s``/``unet_fit_s``) unless it was cached."""
        self.timing[kind] += 0.0 if info.get("cached", True) else float(info.get("fit_s", 0.0))

    def add_inference(self, seconds: float, images: int) -> None:
        self.timing["inference_s"] += seconds
        self.timing["inference_images"] += images


@dataclass(frozen=True)
class FoldTask:
    """What one fold needs: the config, the data and its parts, the held-out sets and its folder."""

    cfg: Config
    ev: EvalSettings
    data: Data
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    out: Path
    externals: Sequence[ScanArrays] = ()

    @classmethod
    def plan(cls, cfg: Config, data: Data, fold: int, out: Path, externals: Sequence[ScanArrays] = ()) -> FoldTask:
        f = data.folds[fold]
        idx = (data.index(f.train), data.index(f.val), data.index(f.test))
        return cls(cfg, EvalSettings.of(cfg), data, fold, *idx, Path(out), externals)


def run_fold(task: FoldTask, names: Sequence[str], progress: Progress) -> FoldOutput:
    """One fold with the prior sources ``names`` (the first fills Table 1's ``methods``); every held-out
    set is also scored by the fold's models (RIAD excluded)."""
    cfg, f, arr = task.cfg, task.fold, task.data.arrays
    out = FoldOutput(
        FoldResult(fold=f), info={"n_train": len(task.train), "n_val": len(task.val), "n_test": len(task.test)}
    )
    out.external = [
        External(FoldResult(fold=f), arrays=ext, weights=fold_weights(ext.patients, cfg.seed, None))
        for ext in task.externals
    ]
    progress.stage(f, "U-Net")
    unet, info = fit_unet(cfg, task.data, task.train, task.val, "single")
    out.add_fit("unet_fit_s", info)
    out.info["unet"] = info
    progress.done()
    policy = fold_policy(arr, task.train, cfg.detector.threshold, cfg.detector.train_classes)
    for name in names:
        source = _fit_source(task, name, name == names[0], policy, out, progress)
        progress.stage(f, f"{name} priors + maps")
        if is_main():  # evaluation needs no other rank
            _evaluate_source(task, unet, source, out)
        progress.done()
    if cfg.riad.enabled:
        progress.stage(f, "RIAD")
        _riad(task, out)
        progress.done()
    return out


def _fit_source(task: FoldTask, name: str, main: bool, policy: Any, out: FoldOutput, progress: Progress) -> Source:
    """The fold's detector of ``name``: trained (or from the cache), or the ground truth as it is."""
    if registry.is_ground_truth(name):
        return Source(name, registry.instance(name), policy, main)
    progress.stage(task.fold, f"{name} fit")
    cfg = replace(task.cfg, detector=replace(task.cfg.detector, name=name))
    det, info = fit_detector(cfg, task.data, task.train, task.val, task.out / name)
    out.add_fit("detector_fit_s", info)
    out.add_fit("detector_fit_s", info.get("refiner") or {})
    out.info[f"detector_{name}"] = info
    progress.done()
    return Source(name, det, policy, main)


def _evaluate_source(task: FoldTask, unet: Any, source: Source, out: FoldOutput) -> None:
    """``source`` on the fold's test part and on every held-out set, into ``out``."""
    arr, ev = task.data.arrays, task.ev
    val, test = arr.subset(task.val), arr.subset(task.test)
    watch = Stopwatch()
    with watch("validation"):
        validation = validation_of(ev, unet, source, val)
    part = evaluate_part(ev, unet, source, test, validation, fold_weights(test.patients, task.cfg.seed, task.fold))
    record_part(out.result, source.name, task.fold, test, part)
    if part.detection is not None:
        write_predictions(task.out / source.name, test, part.priors)
    out.replicates.update(part.replicates)
    out.add_inference(watch.seconds["validation"] + part.seconds, len(val) + len(test))
    for ext in out.external:  # the same models, each held-out set
        assert ext.arrays is not None and ext.weights is not None
        ext_part = evaluate_part(ev, unet, source, ext.arrays, validation, ext.weights)
        record_part(ext.result, source.name, task.fold, ext.arrays, ext_part)
        ext.replicates.update(ext_part.replicates)
        out.add_inference(ext_part.seconds, len(ext.arrays))
        if source.main:
            ext.result.methods.update(ext_part.metrics)
            ext.result.fallbacks = ext_part.priors.fallbacks
    if source.main:
        out.result.methods.update(part.metrics)
        out.result.fallbacks = part.priors.fallbacks
        if task.cfg.evaluation.figures:
            out.examples = fold_examples(task.fold, test, part, ev.kernel)


def _riad(task: FoldTask, out: FoldOutput) -> None:
    """The RIAD baseline of the fold (no location prior), into ``out``."""
    from reconstruction.infer import riad_reconstruct

    cfg, ev, arr = task.cfg, task.ev, task.data.arrays
    val, test = arr.subset(task.val), arr.subset(task.test)
    riad, info = fit_unet(cfg, task.data, task.train, task.val, "riad")
    out.add_fit("unet_fit_s", info)
    out.info["riad"] = info
    if not is_main():  # every rank trains; rank 0 alone evaluates
        return
    rv, rt = (
        riad_reconstruct(riad, images, ks=cfg.riad.ks, maps=(RIAD,), device=ev.device, seed=cfg.seed)
        for images in (val.images, test.images)
    )
    scores = image_scores(rt.maps, test.boxes, ev.score, ev.margin, region="image")  # no prior: the whole image
    metrics = method_metrics(ev, scores, rt.maps, test, Validation(val, rv.maps))
    out.result.methods.update(metrics)
    weights = fold_weights(test.patients, cfg.seed, task.fold)
    out.replicates.update(
        row_replicates(
            NO_PRIOR, RIAD, metrics[RIAD], scores[RIAD], test.labels, rt.maps[RIAD], test.masks, weights, ev.kernel
        )
    )
    pos = {int(i): n for n, i in enumerate(test.ids)}
    for row in out.result.rows:  # an image-level score, the same whatever the row's prior
        row.scores[RIAD] = float(scores[RIAD][pos[row.id]])


# ----------------------------------------------------------------------------- saving and resuming


def save_fold(fdir: Path, fo: FoldOutput) -> None:
    """Write a finished fold; ``fold.json``, written last, marks it done."""
    fdir.mkdir(parents=True, exist_ok=True)
    _save_replicates(fdir / "bootstrap.npz", fo.replicates)
    for i, ext in enumerate(fo.external):
        write_json(fdir / f"external-{i}.json", ext.result.to_json())
        _save_replicates(fdir / f"bootstrap-external-{i}.npz", ext.replicates)
    if fo.examples:
        arrays: dict[str, Any] = {f"{i}_{k}": getattr(e, k) for i, e in enumerate(fo.examples) for k in EXAMPLE_ARRAYS}
        atomic_write(fdir / "examples.npz", lambda p: np.savez_compressed(open(p, "wb"), **arrays))
    meta = [{k: getattr(e, k) for k in ("id", "label", "case", "dice", "score", "method")} for e in fo.examples]
    doc = {"result": fo.result.to_json(), "examples": meta, "timing": fo.timing, "info": fo.info}
    write_json(fdir / "fold.json", json_safe(doc))


def _save_replicates(path: Path, reps: dict[str, np.ndarray]) -> None:
    # npz keys cannot hold "/" portably; the row names never contain "|"
    arrays: dict[str, Any] = {k.replace("/", "|"): v for k, v in reps.items()}
    atomic_write(path, lambda p: np.savez_compressed(open(p, "wb"), **arrays))


def _load_replicates(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: this fold was finished by an older LoRIS without bootstrap replicates; "
            f"start the run again in a new --out folder"
        )
    with np.load(path) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


def load_fold(fdir: Path, n_external: int) -> FoldOutput:
    """A fold saved by :func:`save_fold`."""
    doc = json.loads((fdir / "fold.json").read_text())
    examples = []
    if doc["examples"]:
        with np.load(fdir / "examples.npz") as z:
            for i, meta in enumerate(doc["examples"]):
                examples.append(Example(**meta, **{k: z[f"{i}_{k}"] for k in EXAMPLE_ARRAYS}))
    external = [
        External(
            FoldResult.from_json(json.loads((fdir / f"external-{i}.json").read_text())),
            _load_replicates(fdir / f"bootstrap-external-{i}.npz"),
        )
        for i in range(n_external)
    ]
    reps = _load_replicates(fdir / "bootstrap.npz")
    return FoldOutput(FoldResult.from_json(doc["result"]), examples, doc["timing"], doc["info"], reps, external)
