"""Fold aggregation into the ``summary.json`` sections ``reconstruction``, ``riad``, ``detection``.

Every aggregated metric is ``{"mean", "std", "n", "ddof"}`` with the sample standard deviation
(ddof = 1) across folds, as :func:`evaluation.metrics.aggregate` computes it.

>>> s = summary_sections([{"msgmsd": {"i_auroc": 0.7}}, {"msgmsd": {"i_auroc": 0.9}}])
>>> s["reconstruction"]["msgmsd"]["i_auroc"]["mean"], sorted(s)
(0.8, ['reconstruction'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from evaluation.metrics import aggregate

RIAD = "riad"
# Order of the LoRIS deviation metrics in tables and summaries; unknown names follow.
METHOD_ORDER = ("msgmsd", "dd", "gmsd", "ssim")


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


def json_safe(obj: Any) -> Any:
    """Recursively replace NaN/inf floats by None (strict JSON has no NaN) and numpy scalars by Python ones."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if getattr(obj, "ndim", 0) > 0 and hasattr(obj, "tolist"):  # numpy arrays
        return json_safe(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
