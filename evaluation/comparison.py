"""DeLong's paired ΔI-AUROC of each prior source against the ground-truth prior, per image.

The per-fold tests come from :mod:`evaluation.paired`; folds are combined as disjoint test sets
or, when every fold's models scored the same images (an external set), per image.

>>> rows = [ImageRow(i, f"p{i}", 0, i % 2, s, scores={"msgmsd": i % 2 + 0.1 * i * (s == "gt")})
...         for i in range(6) for s in ("gt", "toy")]
>>> c = prior_comparisons([FoldResult(0, rows=rows)])["toy"]
>>> c["reference"], c["folds"], c["test_images"], round(c["diff"], 3)
('gt', [0], 'one fold', 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.paired import mean_over_folds, mean_over_models, paired_auroc
from evaluation.results import GROUND_TRUTH, FoldResult, ImageRow

COMPARED_METHOD = "msgmsd"  # Table 2's downstream method, whose ΔI-AUROC gets DeLong's interval

# one fold's pairing for one prior: (fold, image ids, labels, reference scores, prior scores)
_Paired = tuple[int, list[int], np.ndarray, np.ndarray, np.ndarray]


def _by_source(rows: Sequence[ImageRow], method: str) -> dict[str, dict[int, ImageRow]]:
    out: dict[str, dict[int, ImageRow]] = {}
    for r in rows:
        if method in r.scores:
            out.setdefault(r.prior_source, {})[r.id] = r
    return out


def _pair_fold(fold: FoldResult, method: str, reference: str) -> dict[str, _Paired]:
    """Each prior's images paired by id with the reference's, in one fold; too few of a class: left out."""
    by_source = _by_source(fold.rows, method)
    ref = by_source.get(reference)
    out: dict[str, _Paired] = {}
    if not ref:
        return out
    for prior, rows in by_source.items():
        ids = sorted(i for i in ref if i in rows) if prior != reference else []
        labels = np.array([ref[i].label for i in ids], int)
        if min(int(labels.sum()), int(len(labels) - labels.sum()), len(ids)) < 2:
            continue
        ref_scores = np.array([ref[i].scores[method] for i in ids])
        out[prior] = (fold.fold, ids, labels, ref_scores, np.array([rows[i].scores[method] for i in ids]))
    return out


def _combine(per_fold: Sequence[_Paired], level: float) -> tuple[bool, dict[str, Any]]:
    """(shared test images?, the pooled test) of one prior's per-fold pairings."""
    # Every fold's models scored the same images (an external test set): the differences are
    # correlated, so they are pooled per image rather than as independent folds.
    shared = len(per_fold) > 1 and all(ids == per_fold[0][1] for _, ids, *_ in per_fold)
    if shared:
        ref = np.stack([t[3] for t in per_fold])
        return True, mean_over_models(per_fold[0][2], ref, np.stack([t[4] for t in per_fold]), level)
    return False, mean_over_folds([paired_auroc(lab, a, b, level) for _, _, lab, a, b in per_fold], level)


def prior_comparisons(
    folds: Sequence[FoldResult], method: str = COMPARED_METHOD, reference: str = GROUND_TRUTH, level: float = 0.95
) -> dict[str, dict[str, Any]]:
    """ΔI-AUROC of each prior source against ``reference`` priors, paired per image (DeLong).

    Per fold, the images scored with both prior sources are paired by id; the result per prior
    is :func:`evaluation.paired.mean_over_folds` (disjoint test folds) or
    :func:`evaluation.paired.mean_over_models` (every fold scored the same images), with the
    per-fold tests. Folds where either source is missing, or a class has fewer than 2 images, are
    left out. Keys are sorted (a summary.json section, not a display order).
    """
    per_prior: dict[str, list[_Paired]] = {}
    for f in folds:
        for prior, paired in _pair_fold(f, method, reference).items():
            per_prior.setdefault(prior, []).append(paired)
    out: dict[str, dict[str, Any]] = {}
    for p, v in sorted(per_prior.items()):
        shared, test = _combine(v, level)
        out[p] = {
            "reference": reference,
            "method": method,
            "folds": [t[0] for t in v],
            "test_images": "shared" if shared else ("disjoint" if len(v) > 1 else "one fold"),
            **test,
        }
    return out
