"""Fold-parallel runs: each process or machine runs ``run --folds k --out RUN_k`` sharing the model cache,
then :func:`aggregate_runs` builds one report from the finished folds (refusing runs made with different
configs, data or splits).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import parse_config
from pipeline.experiment.fold import FoldOutput
from pipeline.experiment.run import RunPlan, aggregate, fold_timing, plan, report, resume
from pipeline.run_dirs import RunDirError, config_differences, run_lock


@dataclass(frozen=True)
class FinishedRun:
    """A finished run folder of a fold-parallel run: its saved config (without ``run_folds``) and folds."""

    path: Path
    config: dict[str, Any]
    folds: list[int]
    splits: str
    total_s: float
    runtime: dict[str, Any] | None = None  # world size, backend, threads (None: a run made before they were kept)

    @classmethod
    def read(cls, path: Path) -> FinishedRun:
        if not (path / "summary.json").is_file() or not (path / "config.yaml").is_file():
            raise RunDirError(f"{path}: not a finished LoRIS run (no summary.json); finish it or leave it out")
        summary = json.loads((path / "summary.json").read_text())
        config = yaml.safe_load((path / "config.yaml").read_text())
        config.pop("run_folds", None)
        missing = [f for f in summary["folds"] if not (path / "folds" / str(f) / "fold.json").is_file()]
        if missing:
            raise RunDirError(f"{path}: folds {missing} have no fold.json; rerun it to finish them")
        splits = (path / "splits.json").read_text()
        folds, total = [int(f) for f in summary["folds"]], float(summary["timing"]["total_s"])
        return cls(path, config, folds, splits, total, summary.get("runtime"))


def _same_inputs(runs: Sequence[FinishedRun], mixed_runtime: bool = False) -> None:
    """Refuse runs made with different configs, data or splits, or that share a fold; and, unless
    ``mixed_runtime``, runs computed with another world size, backend or thread count (the numbers
    depend on them)."""
    first, seen = runs[0], {f: runs[0].path for f in runs[0].folds}
    for run in runs[1:]:
        diff = config_differences(first.config, run.config)
        if not mixed_runtime and run.runtime != first.runtime:
            diff.append(f"runtime {run.runtime} against {first.runtime} (--mixed-runtime pools them anyway)")
        if run.splits != first.splits:
            diff.append("splits.json (the folds themselves)")
        if diff:
            raise RunDirError(
                f"{run.path} was made with a different config or data than {first.path}, so their folds "
                f"cannot be aggregated: {'; '.join(diff)}"
            )
        for f in run.folds:
            if f in seen:
                raise RunDirError(f"fold {f} is in both {seen[f]} and {run.path}; name each fold once")
            seen[f] = run.path


def aggregate_runs(run_dirs: Sequence[Path], out: Path, mixed_runtime: bool = False) -> dict[str, Any]:
    """Tables, summary and report in ``out`` from finished fold-parallel runs (``run --folds k --out
    RUN_k`` each, sharing the model cache); returns the summary. Runs made with different configs
    (``run_folds`` aside), data or splits are refused, naming what differs; the data must be unchanged
    since. Each run's folds are copied into ``out/folds``."""
    if not run_dirs:
        raise ValueError("aggregate: name at least one finished run folder")
    runs = [FinishedRun.read(Path(d)) for d in run_dirs]
    _same_inputs(runs, mixed_runtime)
    saved = runs[0].config
    fold_ids = sorted(f for run in runs for f in run.folds)
    doc = {k: v for k, v in saved.items() if k != "run"} | {"run_folds": fold_ids}
    cfg = replace(parse_config(doc), progress=False)
    with run_lock(Path(out)):
        p = plan(cfg, Path(out), saved["run"]["detectors"], saved["run"]["command"], same_as=saved)
        for run in runs:
            for f in run.folds:
                shutil.copytree(run.path / "folds" / str(f), p.out / "folds" / str(f), dirs_exist_ok=True)
        outputs = [_resumed(p, f) for f in p.fold_ids]
        summary = aggregate(p, outputs)
        total = sum(r.total_s for r in runs)
        summary["timing"] = {"total_s": total, "resumed_folds": len(outputs), **fold_timing(outputs)}
        summary["fold_info"] = [fo.info for fo in outputs]
        summary["aggregated_from"] = [str(r.path) for r in runs]
        report(p, outputs, summary)
    return summary


def _resumed(p: RunPlan, fold: int) -> FoldOutput:
    fo = resume(p, fold)
    if fo is None:
        raise RunDirError(f"{p.out}: fold {fold} was not copied")
    return fo
