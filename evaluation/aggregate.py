"""Fold aggregation into the ``summary.json`` sections ``reconstruction``, ``riad``, ``detection``, ``priors``.

Every aggregated metric is ``{"mean", "std", "n", "ddof"}`` with the sample standard deviation
(ddof = 1) across folds, as :func:`evaluation.metrics.aggregate` computes it.

>>> s = summary_sections([{"msgmsd": {"i_auroc": 0.7}}, {"msgmsd": {"i_auroc": 0.9}}])
>>> s["reconstruction"]["msgmsd"]["i_auroc"]["mean"], sorted(s)
(0.8, ['reconstruction'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evaluation.comparison import prior_comparisons
from evaluation.metrics import aggregate
from evaluation.results import FoldResult, json_safe

RIAD = "riad"
# Order of the LoRIS deviation metrics in tables and summaries; unknown names follow.
METHOD_ORDER = ("msgmsd_c170", "msgmsd", "dd", "gmsd", "ssim")


def ordered_methods(names: Sequence[str]) -> list[str]:
    """LoRIS metrics in table order, then any others alphabetically."""
    known = [m for m in METHOD_ORDER if m in names]
    return known + sorted(n for n in names if n not in known)


def aggregate_methods(per_fold: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, Any]]:
    """``[{method: {metric: value}}]`` per fold -> ``{method: {metric: {mean, std, n, ddof}}}``."""
    names: list[str] = []
    for fold in per_fold:
        names.extend(m for m in fold if m not in names)
    return {m: aggregate([fold[m] for fold in per_fold if m in fold]) for m in ordered_methods(names)}


def summary_sections(
    methods_per_fold: Sequence[Mapping[str, Mapping[str, float]]],
    detection_per_fold: Sequence[Mapping[str, float]] | None = None,
    fallbacks: int | None = None,
    priors_per_fold: Sequence[Mapping[str, Mapping[str, float]]] | None = None,
) -> dict[str, Any]:
    """Build the ``reconstruction`` / ``riad`` / ``detection`` (/ ``priors``) parts of summary.json.

    Args:
        methods_per_fold: per fold, ``{method: segmentation_metrics(...)}`` with the ground-truth
            prior; method ``"riad"`` goes to the ``riad`` section, the others to ``reconstruction``.
        detection_per_fold: per fold, ``detection_metrics(...)`` of the run's detector.
        fallbacks: images (all folds) where the detector found nothing and a fallback box was used.
        priors_per_fold: per fold, ``{prior_source: segmentation_metrics(...)}`` of LoRIS+MSGMSD
            run with a detector's boxes (``"gt"`` may be included); goes to ``priors``.
    """
    methods = aggregate_methods(methods_per_fold)
    out: dict[str, Any] = {"reconstruction": {m: v for m, v in methods.items() if m != RIAD}}
    if RIAD in methods:
        out[RIAD] = methods[RIAD]
    if detection_per_fold:
        det: dict[str, Any] = dict(aggregate(detection_per_fold))
        det["fallbacks"] = int(fallbacks or 0)
        out["detection"] = det
    if priors_per_fold:
        out["priors"] = aggregate_methods(priors_per_fold)
    return out


def summary_from_folds(folds: Sequence[FoldResult], detector: str | None = None) -> dict[str, Any]:
    """``reconstruction``/``riad``/``detection``/``priors``/``prior_comparison`` parts of summary.json.

    ``detector`` picks whose detection metrics fill ``detection`` (default: the only one present).

    >>> sorted(summary_from_folds([FoldResult(0, methods={"riad": {"i_auroc": 0.6}})]))
    ['reconstruction', 'riad']
    """
    dets = sorted({d for f in folds for d in f.detection})
    if detector is None and len(dets) == 1:
        detector = dets[0]
    det = [f.detection[detector] for f in folds if detector in f.detection] if detector else []
    priors = [f.priors for f in folds if f.priors]
    # the fallbacks of the detector reported, which need not be the fold's first prior source
    fallbacks = (
        sum(int(f.detection[detector].get("fallbacks", f.fallbacks)) for f in folds if detector in f.detection)
        if det
        else sum(f.fallbacks for f in folds)
    )
    out = summary_sections([f.methods for f in folds], det or None, fallbacks, priors or None)
    comparison = prior_comparisons(folds)
    if comparison:
        out["prior_comparison"] = comparison
    return out


__all__ = [
    "METHOD_ORDER",
    "RIAD",
    "aggregate_methods",
    "json_safe",
    "ordered_methods",
    "summary_from_folds",
    "summary_sections",
]
