"""Table 1's rows under the other pooling rule and its calibration-error column, from per-image scores.

**Pooling.** A prior-guided method turns its anomaly map into an image score by a pooling rule: the
mean over the whole image (the paper's LoRIS) or inside the prior box (LoRIS-IB, the peers "in the prior
box"). So that Table 1 compares methods, not rules, every prior-guided row also appears under the other
rule, rescored from the same maps (no second inference). Its row is ``<source>/<method>@<region>``
(:func:`pooled_row`); only image-level figures depend on the rule, so such a row holds I-AUROC and ECE,
and its pixel figures are those of the row it rescored.

**Calibration.** A row's ECE is the expected calibration error (:func:`evaluation.metrics.expected_calibration_error`)
of its probability of distension on the test scans: Platt scaling of the image score fitted on the
fold's validation part (the bundle's calibration) and applied to the test part; its interval resamples
patients with the fold's bootstrap weights (:func:`evaluation.bootstrap.weighted_ece`).

>>> pooled_row("msgmsd_c170", "image"), split_pooled("msgmsd_c170@image"), split_pooled("dd")
('msgmsd_c170@image', ('msgmsd_c170', 'image'), ('dd', None))
>>> pooled_label("LoRIS-IB (MSGMSD, GMSD's c)", "image")
"LoRIS-IB (MSGMSD, GMSD's c) · pooled over the whole image"
>>> w = np.ones((3, 4))
>>> m, r = ece_row("gt/dd", np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 0, 1, 1]), w)
>>> round(m["ece"], 6), [round(float(v), 6) for v in r["gt/dd/ece"]]
(0.1, [0.1, 0.1, 0.1])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evaluation.bootstrap import weighted_auroc, weighted_ece
from evaluation.intervals import LEVEL, difference, find_difference, row_interval
from evaluation.metrics import expected_calibration_error, image_auroc

Reps = dict[str, np.ndarray]
Scored = tuple[dict[str, float], Reps]  # one row's metrics and bootstrap replicates on one set
SEP = "@"  # <method>@<region>: the method's map pooled under the other rule
REGIONS = ("image", "box")
POOLING_NAMES = {"image": "pooled over the whole image", "box": "pooled in the prior box"}
ECE = "ece"
ECE_COLUMN = (ECE, "ECE")
# per-image arrays a fold keeps beside its replicates: <source>/<row>/score (the evaluated part) and
# <source>/<row>/val_score (the fold's validation part, where the calibration is fitted)
SCORE, VAL_SCORE = "score", "val_score"
POOLING_NOTE = (
    "'· pooled over the whole image' / '· pooled in the prior box': the row above rescored from the same "
    "maps under the other pooling rule (LoRIS: score.region; the prior-guided peers: the mean of their "
    "full-image map over the whole image), so every prior-guided method appears under both rules. Only "
    "image-level figures (I-AUROC, ECE) depend on the rule; the pixel figures are the row above's."
)
ECE_NOTE = (
    "ECE: expected calibration error (10 equal-width bins) of the probability of distension on the test "
    "scans, Platt scaling of the row's image score fitted on the fold's validation part (as the bundle's "
    "calibration); lower is better. '-': no calibration (a validation part of one class) or no scores kept. "
    "The binned ECE is biased upward on small samples, and a resample (patients drawn with repeats) is "
    "noisier still, so the point can sit below its percentile interval: read the interval as the spread "
    "of the binned estimate, not as a bound on the true calibration error."
)


def pooled_row(method: str, region: str) -> str:
    """The row name of ``method``'s map pooled over ``region`` (``image`` or ``box``)."""
    if region not in REGIONS:
        raise ValueError(f"unknown pooling region {region!r}; choose from {REGIONS}")
    return f"{method}{SEP}{region}"


def split_pooled(method: str) -> tuple[str, str | None]:
    """``(method, region)`` of a pooled row's method name; ``region`` None for a row under its own rule."""
    base, sep, region = method.partition(SEP)
    return (base, region) if sep and region in REGIONS else (method, None)


def other_region(region: str) -> str:
    """The pooling rule that is not ``region``.

    >>> other_region("box"), other_region("image")
    ('image', 'box')
    """
    if region not in REGIONS:
        raise ValueError(f"unknown pooling region {region!r}; choose from {REGIONS}")
    return REGIONS[1 - REGIONS.index(region)]


def pooled_label(label: str, region: str) -> str:
    """A table label for ``label``'s row under the pooling rule ``region``."""
    return f"{label} · {POOLING_NAMES[region]}"


def auroc_row(row: str, scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> Scored:
    """I-AUROC of ``scores`` and its bootstrap replicates under ``w`` ``[B, N]`` (row ``row``)."""
    reps = weighted_auroc(scores, labels, w).astype(np.float32)
    return {"i_auroc": image_auroc(scores, labels)}, {f"{row}/i_auroc": reps}


def ece_row(row: str, probs: np.ndarray, labels: np.ndarray, w: np.ndarray) -> Scored:
    """ECE of ``probs`` (calibrated probabilities of distension) and its replicates under ``w``; empty when
    the probabilities are NaN (no calibration could be fitted)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.size == 0 or not np.all(np.isfinite(p)):
        return {}, {}
    reps = weighted_ece(p, labels, w).astype(np.float32)
    return {ECE: expected_calibration_error(p, labels)}, {f"{row}/{ECE}": reps}


def kept_rows(per_image: Mapping[str, np.ndarray], source: str) -> list[str]:
    """The rows of ``source`` whose per-image test scores a fold kept (``<row>/score`` keys), in order.

    >>> kept_rows({"gt/dd/score": np.zeros(2), "gt/dd/i_auroc": np.zeros(9), "gt/dd@image/score": np.zeros(2)}, "gt")
    ['gt/dd', 'gt/dd@image']
    """
    tail = f"/{SCORE}"
    return [k[: -len(tail)] for k in per_image if k.startswith(f"{source}/") and k.endswith(tail)]


def merge_rows(estimates: dict[str, Mapping[str, float]], reps: Reps, rows: Mapping[str, Scored]) -> None:
    """Add ``rows`` (``{row: (metrics, replicates)}``) to one fold's estimates and replicates; a row that
    is there already gains the new metrics (e.g. its ECE)."""
    for row, (metrics, r) in rows.items():
        estimates[row] = {**estimates.get(row, {}), **metrics}
        reps.update(r)


def add_ece_intervals(
    cl: dict[str, Any], estimates: Sequence[Mapping[str, Mapping[str, float]]], reps: Sequence[Reps]
) -> None:
    """The pooled ECE interval of every row that has one in every fold, into ``cl["rows"]``."""
    for row in sorted({r for e in estimates for r in e if ECE in e[r]}):
        iv = row_interval(estimates, reps, row, ECE, cl.get("level", LEVEL))
        if iv is not None:
            cl.setdefault("rows", {}).setdefault(row, {})[ECE] = iv


def add_differences(
    cl: dict[str, Any],
    estimates: Sequence[Mapping[str, Mapping[str, float]]],
    reps: Sequence[Reps],
    refs: Sequence[str],
    rows: Sequence[str],
    metrics: Sequence[str],
) -> None:
    """Each ``ref`` minus each of ``rows`` for ``metrics`` into ``cl["differences"]``, where absent yet."""
    for ref in refs:
        for row in rows:
            for metric in metrics:
                if row == ref or find_difference(cl, ref, row, metric) is not None:
                    continue
                d = difference(estimates, reps, ref, row, metric, cl.get("level", LEVEL))
                if d is not None:
                    cl["differences"].append(d)
