"""Paired comparison of two image scorers on the same test images: DeLong's test for ΔAUROC.

Table 2 compares LoRIS+MSGMSD with ground-truth priors and with a detector's priors on the same
test images, so the two AUROCs are correlated and their difference has a much smaller variance
than either AUROC's spread across folds suggests. DeLong et al. (1988) give that variance from
the Mann-Whitney structural components; folds are disjoint test sets, so the variance of the
mean over folds is the sum of the fold variances over K². The interval covers test-set sampling
only (the trained models are held fixed), which is the uncertainty a reader needs to judge a
ΔI-AUROC of a few hundredths.

Written here because neither scikit-learn nor SciPy ship DeLong's test. Midranks (SciPy's
``rankdata``) give all structural components in O(N log N) (Sun and Xu, 2014), vectorised.

>>> labels = np.array([0, 0, 0, 1, 1, 1])
>>> a = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
>>> r = paired_auroc(labels, a, a)
>>> round(r.auroc_a, 3), r.diff, r.se
(0.889, 0.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import norm, rankdata


class PairedAuroc(NamedTuple):
    """AUROC of scorers A and B on the same images and DeLong's test of ``diff = B - A``.

    ``ci_low``/``ci_high`` bound ``diff`` at the requested level; ``p_value`` is two-sided. When
    ``se`` is 0 the test is degenerate (e.g. identical rankings, or a perfect scorer against a
    constant one): ``p_value`` is then 1 for no difference and 0 for any.
    """

    auroc_a: float
    auroc_b: float
    diff: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    n_pos: int
    n_neg: int


def _components(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROCs ``[k]`` and DeLong structural components ``V10 [k, m]``, ``V01 [k, n]`` of ``scores [k, N]``."""
    pos, neg = scores[:, labels], scores[:, ~labels]
    m, n = pos.shape[1], neg.shape[1]
    rank_pos = rankdata(pos, axis=1)
    rank_neg = rankdata(neg, axis=1)
    rank_all = rankdata(np.concatenate([pos, neg], 1), axis=1)
    # V10_i: share of negatives scored below positive i (ties count half); V01_j likewise.
    v10 = (rank_all[:, :m] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    auc = v10.mean(1)
    return auc, v10, v01


def paired_auroc(
    labels: Sequence[int] | np.ndarray,
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    level: float = 0.95,
) -> PairedAuroc:
    """DeLong's paired test of two scorers' AUROC on the same images (1 = positive).

    >>> rng = np.random.default_rng(0)
    >>> y = np.r_[np.zeros(50, int), np.ones(50, int)]
    >>> good, noisy = y + rng.normal(0, 0.5, 100), y + rng.normal(0, 2.0, 100)
    >>> r = paired_auroc(y, noisy, good)
    >>> r.diff > 0 and r.ci_low < r.diff < r.ci_high
    True
    """
    y = np.asarray(labels).astype(bool).ravel()
    a, b = np.asarray(scores_a, np.float64).ravel(), np.asarray(scores_b, np.float64).ravel()
    if not len(a) == len(b) == len(y):
        raise ValueError(f"{len(y)} labels but {len(a)} and {len(b)} scores")
    s = np.stack([a, b])
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 positives and 2 negatives, got {m} and {n}")
    auc, v10, v01 = _components(y, s)
    cov = np.cov(v10) / m + np.cov(v01) / n
    diff = float(auc[1] - auc[0])
    se = math.sqrt(max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0))
    return _result(float(auc[0]), float(auc[1]), diff, se, level, m, n)


def _result(a: float, b: float, diff: float, se: float, level: float, m: int, n: int) -> PairedAuroc:
    z = float(norm.ppf(0.5 + level / 2))
    p = float(2 * norm.sf(abs(diff) / se)) if se > 0 else float(diff == 0)
    return PairedAuroc(a, b, diff, se, diff - z * se, diff + z * se, p, m, n)


def mean_over_models(
    labels: Sequence[int] | np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, level: float = 0.95
) -> dict[str, Any]:
    """Mean ΔAUROC of K model pairs scored on the **same** images (an external test set).

    ``scores_a`` and ``scores_b`` are ``[K, N]`` (pair k: fold k's models). The K differences
    share their images, so their variances do not add as in :func:`mean_over_folds`: DeLong's
    structural components are linear in the scorer, so the mean difference gets its own
    components (the mean over k of B's minus A's), and its variance follows exactly.

    >>> y = np.r_[np.zeros(30, int), np.ones(10, int)]
    >>> a = np.stack([y + np.random.default_rng(k).normal(0, 1, 40) for k in range(3)])
    >>> s = mean_over_models(y, a, a)
    >>> s["diff"], s["se"], len(s["per_fold"])
    (0.0, 0.0, 3)
    """
    y = np.asarray(labels).astype(bool).ravel()
    a, b = np.atleast_2d(np.asarray(scores_a, np.float64)), np.atleast_2d(np.asarray(scores_b, np.float64))
    if a.shape != b.shape or a.shape[1] != len(y):
        raise ValueError(f"scores {a.shape} and {b.shape} must both be [K, {len(y)}]")
    per = [paired_auroc(y, a[k], b[k], level) for k in range(len(a))]  # also validates the input
    auc, v10, v01 = _components(y, np.concatenate([a, b]))
    k = len(a)
    d10, d01 = (v10[k:] - v10[:k]).mean(0), (v01[k:] - v01[:k]).mean(0)
    m, n = len(d10), len(d01)
    se = math.sqrt(float(d10.var(ddof=1)) / m + float(d01.var(ddof=1)) / n)
    diffs = auc[k:] - auc[:k]
    return _pooled(
        _result(float(auc[:k].mean()), float(auc[k:].mean()), float(diffs.mean()), se, level, m, n), per, level
    )


def _pooled(pooled: PairedAuroc, per_fold: Sequence[PairedAuroc], level: float) -> dict[str, Any]:
    diffs = np.array([f.diff for f in per_fold])
    return {
        **pooled._asdict(),
        "level": level,
        "median_diff": float(np.median(diffs)),
        "folds_b_lower": int((diffs < 0).sum()),
        "per_fold": [f._asdict() for f in per_fold],
    }


def mean_over_folds(per_fold: Sequence[PairedAuroc], level: float = 0.95) -> dict[str, Any]:
    """Mean ΔAUROC over folds with disjoint test sets, its DeLong interval, and the per-fold values.

    >>> f = PairedAuroc(0.8, 0.7, -0.1, 0.04, -0.18, -0.02, 0.01, 20, 80)
    >>> s = mean_over_folds([f, f._replace(diff=0.1)])
    >>> s["diff"], round(s["se"], 4), s["median_diff"]
    (0.0, 0.0283, 0.0)
    """
    if not per_fold:
        raise ValueError("no folds to pool")
    se = math.sqrt(sum(f.se**2 for f in per_fold)) / len(per_fold)
    pooled = _result(
        float(np.mean([f.auroc_a for f in per_fold])),
        float(np.mean([f.auroc_b for f in per_fold])),
        float(np.mean([f.diff for f in per_fold])),
        se,
        level,
        sum(f.n_pos for f in per_fold),
        sum(f.n_neg for f in per_fold),
    )
    return _pooled(pooled, per_fold, level)
