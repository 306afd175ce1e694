"""Patient-clustered 95% intervals for every figure of Tables 1-2 and every paired difference.

One fold's test images are resampled by patient (:mod:`evaluation.bootstrap`) with **one** weight
matrix per fold, shared by every prior source and every method scored on those images. So a
paired difference is the replicate-wise difference of two rows, and a figure pooled over folds
is the replicate-wise mean over folds (independent draws per fold; one shared draw when every
fold's models scored the same external images).

Rows are named ``"<source>/<method>"``: ``gt/msgmsd``, ``codetr/control_height``, ``none/riad``.

>>> rng = np.random.default_rng(0)
>>> reps = {"gt/a/i_auroc": rng.normal(0.8, 0.02, 500), "gt/b/i_auroc": rng.normal(0.7, 0.02, 500)}
>>> est = {"gt/a": {"i_auroc": 0.8}, "gt/b": {"i_auroc": 0.7}}
>>> d = difference([est], [reps], "gt/a", "gt/b", "i_auroc")
>>> round(d["pooled"]["estimate"], 3), d["pooled"]["low"] > 0
(0.1, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evaluation.aggregate import RIAD
from evaluation.bootstrap import N_BOOT, interval, patient_weights, pooled, replicates
from evaluation.controls import CONTROLS
from evaluation.results import GROUND_TRUTH

METRICS = ("i_auroc", "p_auroc", "dice_oracle", "dice_oracle_post", "dice_val", "precision", "map50", "map75")
LEVEL = 0.95
NO_PRIOR = "none"  # source of methods that use no location prior (RIAD)
LORIS_MAPS = ("msgmsd_c170", "msgmsd", "dd", "gmsd", "ssim")  # LoRIS-IB's score map first
# Where a fold's weights come from: [seed, fold, WEIGHTS_STREAM]; an external set: [seed, EXTERNAL_STREAM].
WEIGHTS_STREAM = 7
EXTERNAL_STREAM = 99
MIN_PATIENTS = 3  # fewer distinct patients in a part: its intervals are NaN (shown as none)


def fold_weights(patients: Sequence[str] | np.ndarray, seed: int, fold: int | None, n_boot: int = N_BOOT) -> np.ndarray:
    """``[n_boot, N]`` patient-cluster weights of one fold's test part (``fold=None``: an external set,
    one draw shared by every fold's models)."""
    key = [seed, EXTERNAL_STREAM] if fold is None else [seed, fold, WEIGHTS_STREAM]
    if len(np.unique(np.asarray(patients))) < MIN_PATIENTS:
        # one or two patients cannot show between-patient spread: no interval rather than a false one
        return np.full((n_boot, len(patients)), np.nan)
    return patient_weights(np.asarray(patients), n_boot, np.random.default_rng(key))


def oracle_grid(maps: np.ndarray, masks: np.ndarray, metrics: Mapping[str, float], n: int = 32) -> np.ndarray:
    """Candidate thresholds for the post-processed oracle Dice in each replicate: the quantiles of the
    anomalous pixels' values that :func:`evaluation.metrics.select_threshold` searches, plus the
    thresholds the estimate chose, so that full weights reproduce the estimate."""
    pos = maps[masks]
    if not pos.size:
        return np.array([np.inf])
    chosen = [metrics[k] for k in ("dice_oracle_threshold", "dice_oracle_post_threshold") if k in metrics]
    return np.unique(np.append(np.quantile(pos, np.linspace(0.0, 1.0, n)), chosen))


def row_replicates(
    src: str,
    method: str,
    metrics: Mapping[str, float],
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    w: np.ndarray,
    kernel: int,
) -> dict[str, np.ndarray]:
    """``{"<src>/<method>/<metric>": [B] float32}`` for one row on one fold's images."""
    reps = replicates(
        scores,
        labels,
        maps,
        masks,
        w,
        val_threshold=float(metrics["dice_val_threshold"]),
        oracle_thresholds=oracle_grid(maps, masks, metrics),
        kernel=kernel,
    )
    return {f"{src}/{method}/{k}": np.asarray(v, np.float32) for k, v in reps.items()}


def _as_dict(iv: Any) -> dict[str, float]:
    return {k: float(v) for k, v in iv._asdict().items()}


def row_interval(
    estimates: Sequence[Mapping[str, Mapping[str, float]]],
    reps: Sequence[Mapping[str, np.ndarray]],
    row: str,
    metric: str,
    level: float = LEVEL,
) -> dict[str, Any] | None:
    """Pooled and per-fold intervals of one row's metric; None when any fold lacks it."""
    key = f"{row}/{metric}"
    if not reps or any(key not in r for r in reps) or any(metric not in e.get(row, {}) for e in estimates):
        return None
    ests = [float(e[row][metric]) for e in estimates]
    per = [interval(v, r[key].astype(np.float64), level) for v, r in zip(ests, reps)]
    pool = interval(float(np.mean(ests)), pooled([r[key].astype(np.float64) for r in reps]), level)
    return {"pooled": _as_dict(pool), "per_fold": [_as_dict(p) for p in per]}


def _paired(
    estimates: Sequence[Mapping[str, Mapping[str, float]]],
    reps: Sequence[Mapping[str, np.ndarray]],
    a: str,
    b: str,
    metric: str,
) -> tuple[list[float], list[np.ndarray]] | None:
    """Per fold, the estimate and the replicates of ``a - b``; None when a fold lacks either row."""
    ka, kb = f"{a}/{metric}", f"{b}/{metric}"
    if not reps or any(ka not in r or kb not in r for r in reps):
        return None
    if any(metric not in e.get(a, {}) or metric not in e.get(b, {}) for e in estimates):
        return None
    ests = [float(e[a][metric]) - float(e[b][metric]) for e in estimates]
    return ests, [r[ka].astype(np.float64) - r[kb].astype(np.float64) for r in reps]


def difference(
    estimates: Sequence[Mapping[str, Mapping[str, float]]],
    reps: Sequence[Mapping[str, np.ndarray]],
    a: str,
    b: str,
    metric: str,
    level: float = LEVEL,
) -> dict[str, Any] | None:
    """Paired difference ``a - b`` of one metric: pooled over folds and per fold; None when absent."""
    got = _paired(estimates, reps, a, b, metric)
    if got is None:
        return None
    ests, diffs = got
    per = [interval(v, d, level) for v, d in zip(ests, diffs)]
    pool = interval(float(np.mean(ests)), pooled(diffs), level)
    return {"a": a, "b": b, "metric": metric, "pooled": _as_dict(pool), "per_fold": [_as_dict(p) for p in per]}


def difference_over_sets(
    sets: Sequence[tuple[Sequence[Mapping[str, Mapping[str, float]]], Sequence[Mapping[str, np.ndarray]]]],
    a: str,
    b: str,
    metric: str,
    level: float = LEVEL,
) -> dict[str, Any] | None:
    """Paired difference ``a - b`` averaged over independent evaluated sets (``(estimates, reps)`` each: the
    test folds, held-out phantoms), with a stratified patient-cluster bootstrap: each set resamples its own
    patients. Every set draws its replicates from the same seeds, so set ``s``'s replicates are put in a
    fixed random order before they are averaged; that makes the sets' draws independent. None when a set
    lacks either row.

    >>> e = [{"a": {"m": 0.9}, "b": {"m": 0.8}}]
    >>> r = [{"a/m": np.linspace(0.8, 1.0, 50), "b/m": np.full(50, 0.8)}]
    >>> d = difference_over_sets([(e, r), (e, r)], "a", "b", "m")
    >>> round(d["pooled"]["estimate"], 3), d["pooled"]["low"] > 0, len(d["per_set"])
    (0.1, True, 2)
    """
    got = [_paired(e, r, a, b, metric) for e, r in sets]
    if not got or any(g is None for g in got):
        return None
    rng = np.random.default_rng(0)
    ests, per_set, reps = [], [], []
    for i, (e, d) in enumerate(g for g in got if g is not None):
        rep = pooled(d)
        ests.append(float(np.mean(e)))
        per_set.append(_as_dict(interval(ests[-1], rep, level)))
        reps.append(rep if i == 0 else rep[rng.permutation(rep.size)])
    pool = interval(float(np.mean(ests)), np.mean(reps, axis=0), level)
    return {"a": a, "b": b, "metric": metric, "pooled": _as_dict(pool), "per_set": per_set}


def best_control(estimates: Sequence[Mapping[str, Mapping[str, float]]], src: str) -> str | None:
    """The control of ``src`` with the highest mean I-AUROC over folds (the strongest no-image reader)."""
    best, best_v = None, -np.inf
    for c in CONTROLS:
        vals = [e[f"{src}/{c}"]["i_auroc"] for e in estimates if f"{src}/{c}" in e]
        if len(vals) == len(estimates) and vals and float(np.mean(vals)) > best_v:
            best, best_v = f"{src}/{c}", float(np.mean(vals))
    return best


def clustered_summary(
    estimates: Sequence[Mapping[str, Mapping[str, float]]],
    reps: Sequence[Mapping[str, np.ndarray]],
    *,
    main_source: str,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Intervals of every row and the paired differences the tables report.

    ``estimates[f]`` maps a row to its fold-``f`` metrics; ``reps[f]`` holds that fold's replicates.
    ``main_source`` is the prior of Table 1 (the run's detector, or ``gt``).
    """
    rows = sorted({r for e in estimates for r in e})
    out: dict[str, Any] = {
        "level": level,
        "n_boot": int(next(iter(reps[0].values())).size) if reps and reps[0] else 0,
        "method": "patient-cluster bootstrap (percentile), resampling patients within each "
        "test fold; pooled = mean over folds",
        "main_source": main_source,
        "rows": {},
        "differences": [],
        "best_control": {},
    }
    for row in rows:
        cells = {m: row_interval(estimates, reps, row, m, level) for m in METRICS}
        out["rows"][row] = {m: c for m, c in cells.items() if c is not None}
    pairs: list[tuple[str, str]] = []
    sources = sorted({r.split("/")[0] for r in rows} - {NO_PRIOR})
    maps = [m for m in LORIS_MAPS if f"{main_source}/{m}" in rows]
    pairs += [(f"{main_source}/{a}", f"{main_source}/{b}") for i, a in enumerate(maps) for b in maps[i + 1 :]]
    if f"{NO_PRIOR}/{RIAD}" in rows and maps:
        pairs += [(f"{main_source}/{m}", f"{NO_PRIOR}/{RIAD}") for m in maps]
    for src in sources:
        ctrl = best_control(estimates, src)
        if ctrl is None:
            continue
        out["best_control"][src] = ctrl
        pairs += [(f"{src}/{m}", ctrl) for m in LORIS_MAPS if f"{src}/{m}" in rows]
    gt, others = GROUND_TRUTH, [s for s in sources if s != GROUND_TRUTH]
    pairs += [(f"{src}/msgmsd", f"{gt}/msgmsd") for src in others if f"{gt}/msgmsd" in rows]
    pairs += [(f"{src}/{c}", f"{gt}/{c}") for src in others for c in CONTROLS if f"{gt}/{c}" in rows]
    for a, b in dict.fromkeys(pairs):
        for m in METRICS:
            d = difference(estimates, reps, a, b, m, level)
            if d is not None:
                out["differences"].append(d)
    return out


def fold_estimates(
    methods: Mapping[str, Mapping[str, float]],
    priors: Mapping[str, Mapping[str, float]],
    controls: Mapping[str, Mapping[str, Mapping[str, float]]],
    main_source: str,
    detection: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Mapping[str, float]]:
    """One fold's rows: Table 1's methods under ``main_source`` (RIAD under ``none``), each source's
    LoRIS+MSGMSD, each source's controls and each detector's detection metrics (``<src>/detection``)."""
    out: dict[str, Mapping[str, float]] = {f"{src}/detection": v for src, v in (detection or {}).items()}
    for m, v in methods.items():
        out[f"{NO_PRIOR}/{m}" if m == RIAD else f"{main_source}/{m}"] = v
    for src, v in priors.items():
        out.setdefault(f"{src}/msgmsd", v)
    for src, per in controls.items():
        for c, v in per.items():
            out[f"{src}/{c}"] = v
    return out


def find_difference(clustered: Mapping[str, Any], a: str, b: str, metric: str) -> dict[str, Any] | None:
    """The difference ``a - b`` of ``metric`` in a :func:`clustered_summary`, if computed."""
    for d in clustered.get("differences", []):
        if d["a"] == a and d["b"] == b and d["metric"] == metric:
            return d
    return None
