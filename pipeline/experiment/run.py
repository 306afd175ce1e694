"""``run`` and ``ablate``: patient-grouped cross-validation of LoRIS with one or more prior sources.

The phases of a run: :func:`plan` (check the config, load and validate the data, prepare the
folder), then per fold :func:`resume` a finished one or fit and evaluate it
(:func:`pipeline.experiment.fold.run_fold`), then :func:`aggregate` the folds into the summary and
:func:`report` it. A fold's result is saved as soon as it is done, so a killed run resumes at the
next fold. The run folder is locked while a process writes it.

Fold-parallel runs: each process or machine runs ``run --folds k --out RUN_k`` sharing the model
cache, then :func:`pipeline.experiment.aggregate.aggregate_runs` builds one report from the finished folds.

Multi-process training: under ``torchrun --nproc-per-node N -m pipeline run ...`` (docs/design.md)
every rank loads the data and fits every model with the others (:mod:`pipeline.shared.models`); rank 0 alone
holds the run folder's lock, evaluates, writes and reports, and the others return its summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evaluation.aggregate import aggregate_methods, json_safe
from evaluation.figures import Example, select_cases
from evaluation.intervals import clustered_summary, fold_estimates
from evaluation.metrics import aggregate as aggregate_folds
from evaluation.report import summary_from_folds, write_report
from evaluation.results import FoldResult, labels_to_json
from pipeline import registry
from pipeline.config import Config
from pipeline.experiment.fold import FoldOutput, FoldTask, Progress, load_fold, run_fold, save_fold, stages_per_fold
from pipeline.provenance import package_versions
from pipeline.run_dirs import (
    RunDirError,
    backfill,
    check_out,
    config_differences,
    prepare_run_dir,
    run_config,
    run_lock,
    write_json,
)
from pipeline.shared.data import Data, external_fingerprint, load_data, load_externals
from runtime.device import runtime_info, set_threads
from runtime.distributed import barrier, broadcast_decision, distributed_session, is_main, main_first
from runtime.timing import Stopwatch
from scans.records import ScanArrays

NO_DETECTION = {"precision": None, "map50": None, "map75": None}


@dataclass(frozen=True)
class RunPlan:
    """A run about to start: its config, command, prior sources, folder, data, folds and held-out sets."""

    cfg: Config
    command: str
    names: list[str]  # as asked: the first is Table 1's source
    sources: list[str]  # what every fold evaluates: ``names`` and the ground truth
    out: Path
    data: Data
    externals: list[ScanArrays]
    fold_ids: list[int]

    @property
    def main(self) -> str:
        return self.names[0]

    @property
    def reported(self) -> str | None:
        """Whose detection metrics fill ``summary["detection"]``: run's own trained detector, else none."""
        return self.main if self.command == "run" and not registry.is_ground_truth(self.main) else None


def plan(cfg: Config, out: Path, names: Sequence[str], command: str, same_as: dict[str, Any] | None = None) -> RunPlan:
    """Check the sources and folds, load and validate the data and held-out sets, prepare ``out`` (or
    continue it: same config, sources and data content). ``same_as``: a saved ``config.yaml`` the run
    must match, ``run_folds`` aside (:func:`pipeline.experiment.aggregate.aggregate_runs`)."""
    known = registry.names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown detector(s) {unknown}; choose from {', '.join(known)}")
    if not is_main():  # the other ranks of a torchrun job only fit models: no folder, no held-out sets
        data = main_first(lambda: load_data(cfg))
        return RunPlan(cfg, command, list(names), _every(names), out, data, [], _fold_ids(cfg, data))
    check_out(out)
    data = main_first(lambda: load_data(cfg))
    ext_paths = cfg.evaluation.external_paths
    externals = load_externals(ext_paths, data, cfg.image_size, cfg.frame)
    identity: dict[str, Any] = {"command": command, "detectors": list(names), "data": data.fingerprint}
    if ext_paths:  # a resume must score the same held-out sets
        identity["external_data"] = [external_fingerprint(p) for p in ext_paths]
    if same_as is not None:
        _unchanged(same_as, run_config(cfg, identity))
    out = prepare_run_dir(out, cfg, identity=identity)
    write_json(out / "splits.json", [fold.to_json() for fold in data.folds])
    return RunPlan(cfg, command, list(names), _every(names), out, data, externals, _fold_ids(cfg, data))


def _every(names: Sequence[str]) -> list[str]:
    """What every fold evaluates: ``names`` and the ground truth (cheap once the U-Net exists)."""
    every = list(dict.fromkeys(names))
    return every + ([] if registry.ground_truth() in every else [registry.ground_truth()])


def _fold_ids(cfg: Config, data: Data) -> list[int]:
    """The folds to run (``run_folds``, else all), each checked (:func:`_check_parts`)."""
    fold_ids = list(cfg.run_folds) if cfg.run_folds is not None else list(range(len(data.folds)))
    _check_parts(data, fold_ids)
    return fold_ids


def _unchanged(saved: dict[str, Any], now: dict[str, Any]) -> None:
    a, b = ({k: v for k, v in d.items() if k != "run_folds"} for d in (backfill(saved), now))
    diff = config_differences(a, b)
    if diff:
        raise RunDirError(f"the config or data changed since these folds were made: {'; '.join(diff)}")


def _check_parts(data: Data, fold_ids: Sequence[int]) -> None:
    bad = [f for f in fold_ids if not 0 <= int(f) < len(data.folds)]
    if bad:
        raise ValueError(f"folds {bad} do not exist; the data has {len(data.folds)} folds")
    for f in fold_ids:
        for part in ("val", "test"):
            labels = data.arrays.labels[data.index(getattr(data.folds[int(f)], part))]
            if len(set(labels.tolist()) & {0, 1}) < 2:
                raise ValueError(
                    f"fold {f}: its {part} part holds only {'distended' if labels.all() else 'normal'} "
                    f"scans, so AUROC and the validation Dice threshold are undefined; use more data, "
                    f"fewer folds (--set folds=3) or a splits.json with both classes in every part"
                )


def resume(p: RunPlan, fold: int) -> FoldOutput | None:
    """The fold's saved output when an earlier invocation finished it, else None."""
    fdir = p.out / "folds" / str(fold)
    return load_fold(fdir, len(p.externals)) if (fdir / "fold.json").is_file() else None


def run_folds(p: RunPlan) -> tuple[list[FoldOutput], int]:
    """Every fold of the plan, resumed or fitted and evaluated (and saved); returns them and how many resumed."""
    per_fold = stages_per_fold(p.sources, p.cfg.riad.enabled)
    bar = Progress(len(p.fold_ids), per_fold, p.cfg.progress and is_main())
    outputs, resumed = [], 0
    try:
        for f in p.fold_ids:
            fo = resume(p, f) if is_main() else None
            if broadcast_decision(fo is not None):  # rank 0 decides: every rank skips the same folds
                resumed += 1
                bar.done(per_fold)
            else:
                fdir = p.out / "folds" / str(f)
                fo = run_fold(FoldTask.plan(p.cfg, p.data, int(f), fdir, p.externals), p.sources, bar)
                if is_main():
                    save_fold(fdir, fo)
            if fo is not None:
                outputs.append(fo)
    finally:
        bar.close()
    return outputs, resumed


def execute(cfg: Config, out: Path, detector_names: Sequence[str], command: str = "run") -> dict[str, Any]:
    """Run (or resume) the cross-validation into ``out`` and write every output; returns the summary.

    ``out`` is locked for the whole run (:func:`pipeline.run_dirs.run_lock`): a second process refuses.
    Under torchrun (:func:`distributed_session`) every rank calls it; the summary is rank 0's."""
    with distributed_session(cfg.device):
        if not is_main():
            return _follow(cfg, Path(out), detector_names, command)
        summary = _lead(cfg, Path(out), detector_names, command)
        barrier()  # summary.json is written
    return summary


def _follow(cfg: Config, out: Path, detector_names: Sequence[str], command: str) -> dict[str, Any]:
    """A torchrun rank other than 0: fit every model with the others, then read rank 0's summary."""
    set_threads(cfg.threads)
    run_folds(plan(cfg, out, detector_names, command))
    barrier()
    return dict(json.loads((out / "summary.json").read_text()))


def _lead(cfg: Config, out: Path, detector_names: Sequence[str], command: str) -> dict[str, Any]:
    """The run as one process does it (rank 0 under torchrun): lock, plan, folds, summary, report."""
    watch = Stopwatch()
    with run_lock(Path(out)):
        with watch("total"):
            set_threads(cfg.threads)
            p = plan(cfg, Path(out), detector_names, command)
            outputs, resumed = run_folds(p)
            summary = aggregate(p, outputs)
        # total_s is this invocation's wall time; folds resumed from disk kept their stage times.
        summary["timing"] = {"total_s": watch.seconds["total"], "resumed_folds": resumed, **fold_timing(outputs)}
        summary["fold_info"] = [fo.info for fo in outputs]
        summary["runtime"] = runtime_info()  # this invocation's world size, backend and torch threads
        summary["reused_models"] = reused_models(outputs)
        report(p, outputs, summary)
    return summary


def reused_models(outputs: Sequence[FoldOutput]) -> list[dict[str, Any]]:
    """Every model a fold took from the cache, with how it was trained (``trained_with``: world size,
    backend and torch threads; null for entries made before LoRIS recorded it).

    >>> fo = FoldOutput(FoldResult(fold=2), [], {}, {"unet": {"cached": True, "cache": "c/u", "trained_with": None}})
    >>> reused_models([fo])
    [{'fold': 2, 'model': 'unet', 'cache': 'c/u', 'trained_with': None}]
    """
    out = []
    for fo in outputs:
        for name, info in fo.info.items():
            refiner = info.get("refiner") if isinstance(info, dict) else None
            for model, part in ((name, info), (f"{name}/refiner", refiner)):
                if isinstance(part, dict) and part.get("cached"):
                    used = {"cache": part.get("cache"), "trained_with": part.get("trained_with")}
                    out.append({"fold": fo.result.fold, "model": model, **used})
    return out


# ----------------------------------------------------------------------------- aggregate


def _summarise(
    results: Sequence[FoldResult], reps: Sequence[dict[str, Any]], main_source: str, reported: str | None
) -> dict[str, Any]:
    """Fold aggregates, prior-only controls and patient-clustered intervals of one evaluated set."""
    out = summary_from_folds(results, detector=reported)
    names = sorted({s for r in results for s in r.controls})
    out["controls"] = {s: aggregate_methods([r.controls[s] for r in results if s in r.controls]) for s in names}
    estimates = [fold_estimates(r.methods, r.priors, r.controls, main_source, r.detection) for r in results]
    out["clustered"] = clustered_summary(estimates, reps, main_source=main_source)
    return out


def aggregate(p: RunPlan, outputs: Sequence[FoldOutput]) -> dict[str, Any]:
    """The run's summary (without timing and fold infos): fold aggregates, intervals, detection figures."""
    results = [fo.result for fo in outputs]
    summary: dict[str, Any] = {
        "detector": p.main if p.command == "run" else list(p.names),
        "data": str(p.data.root),
        "profile": p.cfg.profile,
        "folds": [int(f) for f in p.fold_ids],
        "folds_source": p.data.folds_source,
        "labels": labels_to_json(registry.labels()),  # how reports and evaluation.claims name each source
    }
    summary.update(_summarise(results, [fo.replicates for fo in outputs], p.main, p.reported))
    trained = [d for d in p.names if not registry.is_ground_truth(d)]
    if p.command == "ablate":
        summary["detection_by_detector"] = {
            d: aggregate_folds([r.detection[d] for r in results if d in r.detection]) for d in trained
        }
        summary["fallbacks_by_detector"] = {
            d: int(sum(r.detection[d].get("fallbacks", 0) for r in results if d in r.detection)) for d in trained
        }
    if "detection" not in summary:
        note = "several detectors: see detection_by_detector" if p.command == "ablate" else None
        summary["detection"] = {
            **{k: {"mean": None, "std": None} for k in NO_DETECTION},
            "fallbacks": sum(r.fallbacks for r in results),
            "note": note or "ground-truth priors: no detector",
        }
    return summary


def fold_timing(outputs: Sequence[FoldOutput]) -> dict[str, Any]:
    """Stage times summed over folds, and inference throughput."""
    keys = ("detector_fit_s", "unet_fit_s", "inference_s")
    timing: dict[str, Any] = {k: float(sum(fo.timing[k] for fo in outputs)) for k in keys}
    n_inf = sum(fo.timing["inference_images"] for fo in outputs)
    timing["inference_images_per_s"] = n_inf / timing["inference_s"] if timing["inference_s"] else None
    return timing


def _examples(outputs: Sequence[FoldOutput]) -> list[Example]:
    """The figure cases over all folds, picked again among every fold's candidates."""
    examples = [e for fo in outputs for e in fo.examples]
    if not examples:
        return []
    picks = select_cases(
        [e.id for e in examples], [e.label for e in examples], [e.dice for e in examples], [e.score for e in examples]
    )
    by_id = {e.id: e for e in examples}
    fields = Example.__dataclass_fields__
    return [Example(**{**{k: getattr(by_id[i], k) for k in fields}, "case": c}) for i, _, c in picks]


# ----------------------------------------------------------------------------- report


def external_dirs(out: Path, paths: Sequence[str]) -> list[Path]:
    """Report folder per external set: ``<out>/external`` for one, ``<out>/external/<name>`` for several."""
    if len(paths) == 1:
        return [out / "external"]
    names: list[str] = []
    for p in paths:
        base = Path(p).name or "set"
        names.append(base if base not in names else f"{base}-{len(names)}")
    return [out / "external" / n for n in names]


def _write(
    p: RunPlan, where: Path, summary: dict[str, Any], results: list[FoldResult], examples: list[Example]
) -> None:
    """Tables, figures and report.html of one evaluated set, then its summary.json."""
    figures = p.cfg.evaluation.figures
    write_report(
        where,
        summary,
        results,
        p.cfg.to_dict(),
        package_versions(),
        examples if figures else (),
        prior_name=registry.prior_phrase(p.main),
        figures=figures,
        clustered=summary["clustered"],
        labels=registry.labels(),
        refined=p.cfg.detector.refine,
    )


def _report_external(p: RunPlan, outputs: Sequence[FoldOutput], summary: dict[str, Any], i: int, path: str) -> None:
    """The report of held-out set ``i``: every fold's models on all of it."""
    where = external_dirs(p.out, p.cfg.evaluation.external_paths)[i]
    ext = p.externals[i]
    results = [fo.external[i].result for fo in outputs]
    ext_summary: dict[str, Any] = {
        "detector": summary["detector"],
        "data": path,
        "trained_on": str(p.data.root),
        "profile": p.cfg.profile,
        "folds": summary["folds"],
        "labels": summary["labels"],
        "images": len(ext),
        "distended": int((ext.labels == 1).sum()),
        "note": "each fold's models scored every image of this held-out set; thresholds from "
        "each fold's validation part; intervals resample its patients once for all fold "
        "models; RIAD not run here",
        **_summarise(results, [fo.external[i].replicates for fo in outputs], p.main, p.reported),
    }
    _write(p, where, ext_summary, results, [])
    write_json(where / "summary.json", json_safe(ext_summary))
    keys = ["images", "distended", "controls", "clustered"] + [
        k for k in ("priors", "prior_comparison") if k in ext_summary
    ]
    entry: dict[str, Any] = {"data": path, "report": str(where.relative_to(p.out))}
    summary["external"].append(entry | {k: ext_summary[k] for k in keys})


def report(p: RunPlan, outputs: Sequence[FoldOutput], summary: dict[str, Any]) -> None:
    """Write every output of the run; ``summary.json`` last, its presence marks the run finished."""
    summary["external"] = []
    for i, path in enumerate(p.cfg.evaluation.external_paths):
        _report_external(p, outputs, summary, i, path)
    results = [fo.result for fo in outputs]
    _write(p, p.out, summary, results, _examples(outputs))
    write_json(p.out / "per_fold.json", json_safe([asdict(r) | {"rows": len(r.rows)} for r in results]))
    write_json(p.out / "summary.json", json_safe(summary))
