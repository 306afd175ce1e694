"""The image score's calibration: Platt scaling fitted on a validation part (:func:`fit_calibration`,
bundle.json's ``calibration``) and the probability of distension it gives (:func:`calibrate`). ``train``
fits it for a bundle, ``compare`` for every compared method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

CALIBRATION_METHODS = ("platt", "none")  # "none": the validation part could not fit one (one class only)


def _platt(s: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` of the unpenalised logistic fit of the soft ``target`` on ``s``, in raw score units;
    ``a`` is 0 (the prevalence alone) for a flat score or a fit that would fall as the score rises."""
    from sklearn.linear_model import LogisticRegression

    n = s.size
    a, b = 0.0, float(np.log(target.mean() / (1 - target.mean())))
    mean, std = float(s.mean()), float(s.std())
    if std > 0:
        z = (s - mean) / std
        # each scan twice, as distended with weight t and as normal with weight 1 - t: the soft targets
        fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000)
        fit.fit(np.r_[z, z][:, None], np.r_[np.ones(n), np.zeros(n)], sample_weight=np.r_[target, 1 - target])
        slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        if slope > 0:
            a, b = slope / std, intercept - slope * mean / std
    return a, b


def fit_calibration(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Platt scaling of the image score on the validation part: bundle.json's ``calibration``.

    The probability of distension of a scan with image score ``score`` is::

        p = 1 / (1 + exp(-(a * score + b)))

    with ``a >= 0`` and ``b`` from a logistic regression of the labels on the standardised scores
    (scikit-learn, unpenalised), mapped back to raw score units. Platt's (1999) targets stand in for the
    labels, ``(n_distended + 1) / (n_distended + 2)`` and ``1 / (n_normal + 2)``, so a validation part
    with few distended scans, or scores that separate the classes, still gives finite ``a`` and ``b``.
    Monotone: where the fit would make the probability fall as the score rises (scores ranking normal
    scans above distended ones), ``a`` is 0 and every scan gets the validation prevalence (pulled
    towards one half by those targets). Returns
    ``{"method": "platt", "a", "b", "n", "n_distended", "ece_validation"}`` (``ece_validation``: the
    :func:`~evaluation.metrics.expected_calibration_error` of the fitted probabilities on those same
    scans, an in-sample figure), or ``{"method": "none", "reason", "n", "n_distended"}`` when the part
    lacks a class: no probability is invented then.

    >>> c = fit_calibration(np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9]), np.array([0, 0, 1, 0, 1, 1]))
    >>> c["method"], c["a"] > 0, c["n"], c["n_distended"]
    ('platt', True, 6, 3)
    >>> fit_calibration(np.array([0.1, 0.2]), np.array([0, 0]))["method"]
    'none'
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(np.int64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("image scores contain NaN or inf")
    n, n_pos = int(s.size), int(y.sum())
    counts = {"n": n, "n_distended": n_pos}
    if n_pos == 0 or n_pos == n:
        kind = "no distended" if n_pos == 0 else "no normal"
        return {"method": "none", "reason": f"the validation part has {kind} scan", **counts}
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n - n_pos + 2))
    from evaluation.metrics import expected_calibration_error  # training only: serving needs no evaluation module

    a, b = _platt(s, target)
    doc = {"method": "platt", "a": a, "b": b, **counts}
    ece = expected_calibration_error(calibrate(s, doc), y)
    return {**doc, "ece_validation": ece}


def calibrate(scores: np.ndarray, calibration: Mapping[str, Any] | None) -> np.ndarray:
    """``[N]`` probabilities of distension for image scores by bundle.json's ``calibration``
    (:func:`fit_calibration`): ``1 / (1 + exp(-(a * score + b)))`` for Platt scaling, NaN for every scan
    when there is none (a bundle made before calibration, or a validation part with one class). Both
    engines (:class:`pipeline.serve.bundle.Bundle` and ``pipeline.serve.onnx_bundle.OnnxBundle``) call it.

    >>> calibrate(np.array([-1.0, 0.0, 1.0]), {"method": "platt", "a": 2.0, "b": 0.0}).round(3).tolist()
    [0.119, 0.5, 0.881]
    >>> calibrate(np.array([0.3]), None).tolist()
    [nan]
    """
    s = np.asarray(scores, dtype=np.float64)
    if not calibration or calibration.get("method") != "platt":
        return np.full(s.shape, np.nan)
    from scipy.special import expit  # 1 / (1 + exp(-x)), without overflow for large |x|

    return np.asarray(expit(float(calibration["a"]) * s + float(calibration["b"])), dtype=np.float64)
