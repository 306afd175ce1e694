"""Patient-clustered bootstrap intervals for every metric and every paired difference.

Images of one patient are not independent (a shared anatomy, probe setting and distension state;
in a test fold half of the distended images can come from one patient), so per-image intervals
such as DeLong's under-cover. Here the resampling unit is the patient: each replicate draws the
test fold's patients with replacement and gives every image the number of times its patient was
drawn as a weight. Each metric is then a weighted sum of per-image sufficient statistics
(image scores; per-image pixel histograms; per-image Dice counts at fixed thresholds), so a
replicate costs a matrix product instead of a pass over the pixels: one weight matrix ``W``
``[B, N]`` evaluates all ``B`` replicates at once.

Usage. Per fold, draw **one** ``W`` and apply it to every method and prior source scored on that
fold's test images, so a paired difference is the replicate-wise difference; the pooled figure
over folds is the replicate-wise mean. For an external set scored by every fold's model, draw one
``W`` for the set and share it across folds.

>>> rng = np.random.default_rng(0)
>>> patients = np.repeat([f"p{i}" for i in range(12)], 5)           # 12 patients, 5 images each
>>> labels = (np.repeat(rng.random(12), 5) < 0.4).astype(int)        # distension is per patient
>>> a = labels + rng.normal(0, 1, 60); b = a + 0.5 * labels + rng.normal(0, 0.5, 60)
>>> folds = []
>>> for fold in range(2):
...     W = patient_weights(patients, N_BOOT, np.random.default_rng([0, fold, 7]))
...     ra, rb = weighted_auroc(a, labels, W), weighted_auroc(b, labels, W)
...     ea, eb = (float(weighted_auroc(s, labels, np.ones((1, 60)))[0]) for s in (a, b))
...     folds.append((eb - ea, rb - ra))
>>> fold0 = interval(folds[0][0], folds[0][1])                   # one fold's ΔAUROC (B - A)
>>> both = interval(np.mean([f[0] for f in folds]), pooled([f[1] for f in folds]))
>>> fold0.low < fold0.estimate < fold0.high, both.n_valid <= N_BOOT
(True, True)

For anomaly maps, :func:`replicates` returns all five metrics' replicates of one method at once.
For a calibrated probability of distension, :func:`weighted_ece` gives the replicates of its ECE.
Replicates in which a class has no weight (no distended patient drawn) are NaN and left out of
the interval, which therefore conditions on both classes being present, as the estimate does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from evaluation.metrics import ECE_BINS, calibration_bins
from scans.morphology import close_open

N_BOOT = 2000
_CHUNK = 32  # images per block when passing over pixel maps: memory O(_CHUNK * H * W + N * K)
_MAX_SAMPLE = 4_000_000  # pixel values sorted to place histogram edges


class Interval(NamedTuple):
    """Point estimate, percentile bootstrap interval, bootstrap SE, and how many replicates were finite."""

    estimate: float
    low: float
    high: float
    se: float
    n_valid: int


def patient_weights(patients: Sequence[str] | np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, N]`` float64 image weights of a patient-cluster bootstrap.

    Each replicate draws P - 1 of the P distinct patients with replacement (P when P = 1); an image's
    weight is the number of times its patient was drawn. Drawing P - 1 makes the bootstrap variance
    of a mean over patients unbiased (P draws give (P-1)/P of it), which matters with the 6-20
    patients of a test fold. Column order is the order of ``patients``.

    >>> patient_weights(["a", "a", "b"], 3, np.random.default_rng(1)).shape
    (3, 3)
    """
    ids = np.asarray(patients).ravel()
    if ids.size == 0:
        raise ValueError("no images to resample")
    _, inverse = np.unique(ids, return_inverse=True)
    n_pat = int(inverse.max()) + 1
    counts = rng.multinomial(max(n_pat - 1, 1), np.full(n_pat, 1.0 / n_pat), size=n_boot)  # [B, P]
    return counts[:, inverse.ravel()].astype(np.float64)


def _weights(w: np.ndarray, n: int) -> np.ndarray:
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights {w.shape} must be [B, {n}]")
    return w


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``[B]`` AUROC (ties count 1/2) of ``scores`` under image weights ``w`` ``[B, N]``.

    NaN where either class has zero total weight. Weights of ones give scikit-learn's
    ``roc_auc_score``; integer weights equal it on the data repeated that many times.
    Sorts once, then per replicate sums weights by distinct score and accumulates negatives.

    >>> weighted_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]), np.ones((1, 4))).tolist()
    [0.75]
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("image scores contain NaN or inf")
    w = _weights(w, s.size)
    order = np.argsort(s, kind="stable")
    ss, ys = s[order], y[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ws = w[:, order]
    pos = np.add.reduceat(np.where(ys, ws, 0.0), starts, axis=1)  # [B, distinct scores]
    neg = np.add.reduceat(np.where(ys, 0.0, ws), starts, axis=1)
    return _auc_from_bins(pos, neg)


def _auc_from_bins(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC from ``[B, K]`` class weights in ascending score bins; same-bin pairs count 1/2."""
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(1)
    ok = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, num / np.where(ok, n_pos * n_neg, 1.0), np.nan)


def weighted_ece(probs: np.ndarray, labels: np.ndarray, w: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """``[B]`` expected calibration error of probabilities under image weights ``w`` ``[B, N]``.

    :func:`evaluation.metrics.expected_calibration_error` with every image counted ``w[b, n]`` times in
    replicate ``b`` (same equal-width bins): ``sum_k |sum_{n in k} w (p - y)| / sum_n w``. NaN where the
    total weight is zero; a replicate without a distended (or normal) image is still defined.
    Weights of ones give the unweighted ECE.

    >>> p, y = np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 0, 1, 1])
    >>> [round(v, 6) for v in weighted_ece(p, y, np.array([[1.0, 1, 1, 1], [2, 0, 0, 0]])).tolist()]
    [0.1, 0.1]
    """
    p, bins = calibration_bins(probs, labels, n_bins)
    gap = p - np.asarray(labels, dtype=np.float64).ravel()
    w = _weights(w, p.size)
    onehot = np.zeros((p.size, n_bins))
    onehot[np.arange(p.size), bins] = 1.0
    per_bin = np.abs((w * gap) @ onehot)  # [B, n_bins]: |weighted sum of p - y| in each bin
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, per_bin.sum(1) / np.where(total > 0, total, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------
# Pixel level


class PixelHist(NamedTuple):
    """Per-image pixel histograms of one map method: the sufficient statistics of P-AUROC and oracle Dice.

    ``pos``/``neg`` ``[N, K]`` count anomalous/normal pixels of image n in bin k, which holds
    values in ``[edges[k], edges[k + 1])`` (the last bin is unbounded above).
    """

    pos: np.ndarray
    neg: np.ndarray
    edges: np.ndarray


def _stack(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be [N, H, W]")
    return maps, masks


def _edges(sorted_vals: np.ndarray, n_q: int) -> list[np.ndarray]:
    """Quantile values of a sorted sample, and for values with heavy exact ties the next distinct value.

    The latter closes the tied value's bin just above it, so e.g. DD's many exact zeros are one
    bin of their own rather than sharing it with the smallest non-zero values.
    """
    n = sorted_vals.size
    if n == 0:
        return []
    q = sorted_vals[np.floor(np.linspace(0.0, 1.0, n_q + 1) * (n - 1)).astype(np.int64)]
    q = np.unique(q)
    left = np.searchsorted(sorted_vals, q, side="left")
    right = np.searchsorted(sorted_vals, q, side="right")
    heavy = (right - left > n / n_q) & (right < n)
    return [q, sorted_vals[right[heavy]]]


def pixel_hist(maps: np.ndarray, masks: np.ndarray, n_bins: int = 1024) -> PixelHist:
    """Per-image histograms of ``maps`` ``[N, H, W]`` split by ``masks`` ``[N, H, W]``.

    Edges are ``n_bins / 2`` quantiles of all pixel values united with ``n_bins / 2`` quantiles of
    the anomalous ones (where P-AUROC and the Dice optimum are decided), plus an isolating edge
    above any heavily tied value; edges are data values, the first the global minimum. Binned
    P-AUROC errs by at most half the share of (pos, neg) pairs sharing a bin; binned max-Dice
    only by the gap between the optimal threshold and the nearest edge below it (both measured
    under 0.005, see the tests). ``K`` may differ slightly from ``n_bins``.
    Values are sorted from a strided sample of at most 4 M pixels; counting runs in chunks.
    """
    maps, masks = _stack(maps, masks)
    n = maps.shape[0]
    step = max(1, math.ceil(maps.size / _MAX_SAMPLE))
    lo = math.inf
    sample_all, sample_pos = [], []
    for s in range(0, n, _CHUNK):
        block = np.asarray(maps[s : s + _CHUNK])
        if not np.all(np.isfinite(block)):
            raise ValueError("anomaly maps contain NaN or inf")
        lo = min(lo, float(block.min()))
        sample_all.append(block.ravel()[::step])
        sample_pos.append(block[np.asarray(masks[s : s + _CHUNK], dtype=bool)][::step])
    n_q = max(n_bins // 2, 1)
    all_sorted = np.sort(np.concatenate(sample_all).astype(np.float64))
    pos_sorted = np.sort(np.concatenate(sample_pos).astype(np.float64))
    edges = np.unique(np.concatenate([[lo], *_edges(all_sorted, n_q), *_edges(pos_sorted, n_q)]))
    k = edges.size
    pos = np.empty((n, k), np.int64)
    neg = np.empty((n, k), np.int64)
    for s in range(0, n, _CHUNK):
        block = np.asarray(maps[s : s + _CHUNK])
        m = block.shape[0]
        idx = np.searchsorted(edges, block.reshape(m, -1).astype(np.float64), side="right") - 1
        code = (idx + k * np.arange(m)[:, None]) * 2 + np.asarray(masks[s : s + _CHUNK], bool).reshape(m, -1)
        counts = np.bincount(code.ravel(), minlength=2 * k * m).reshape(m, k, 2)
        neg[s : s + m], pos[s : s + m] = counts[..., 0], counts[..., 1]
    return PixelHist(pos, neg, edges)


def _bin_weights(h: PixelHist, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = _weights(w, h.pos.shape[0])
    return w @ h.pos.astype(np.float64), w @ h.neg.astype(np.float64)  # [B, K] each


def weighted_pixel_auroc(h: PixelHist, w: np.ndarray) -> np.ndarray:
    """``[B]`` pooled pixel AUROC under image weights ``w`` ``[B, N]``; NaN when a class has no weight."""
    pos, neg = _bin_weights(h, w)
    return _auc_from_bins(pos, neg)


def _dice_max(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]  # anomalous pixels >= edge k
    pred = tp + np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
    true = tp[:, :1]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * tp / (pred + true)
    return np.where(true[:, 0] > 0, np.nanmax(np.where(pred + true > 0, dice, 0.0), axis=1), np.nan)


def weighted_dice_max(h: PixelHist, w: np.ndarray) -> np.ndarray:
    """``[B]`` pooled Dice maximised over thresholds ``map >= edge``: the oracle Dice before post-processing.

    NaN when no anomalous pixel has weight.
    """
    pos, neg = _bin_weights(h, w)
    return _dice_max(pos, neg)


class DiceCounts(NamedTuple):
    """Per-image counts after post-processing at fixed thresholds: the sufficient statistics of pooled Dice.

    ``tp``/``pred`` ``[N, T]``: true-positive and predicted pixels of image n at threshold t;
    ``true`` ``[N]``: anomalous pixels.
    """

    tp: np.ndarray
    pred: np.ndarray
    true: np.ndarray


def dice_counts(
    maps: np.ndarray, masks: np.ndarray, thresholds: Sequence[float] | np.ndarray, kernel: int = 3
) -> DiceCounts:
    """Binarise ``map >= t`` for each threshold, close-then-open with ``kernel`` (as
    :func:`evaluation.metrics.pooled_dice`), and count per image; processed in chunks of images."""
    maps, masks = _stack(maps, masks)
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    n = maps.shape[0]
    tp = np.empty((n, t.size), np.int64)
    pred = np.empty((n, t.size), np.int64)
    true = np.empty(n, np.int64)
    for s in range(0, n, _CHUNK):
        block = np.asarray(maps[s : s + _CHUNK])
        mask = np.asarray(masks[s : s + _CHUNK], dtype=bool)
        true[s : s + len(block)] = np.count_nonzero(mask, axis=(1, 2))
        for j, th in enumerate(t):
            p = close_open(block >= th, kernel)
            tp[s : s + len(block), j] = np.count_nonzero(p & mask, axis=(1, 2))
            pred[s : s + len(block), j] = np.count_nonzero(p, axis=(1, 2))
    return DiceCounts(tp, pred, true)


def weighted_dice(c: DiceCounts, w: np.ndarray) -> np.ndarray:
    """``[B]`` pooled Dice maximised over the T thresholds of ``c`` (T = 1: the fixed-threshold Dice).

    NaN when no anomalous pixel has weight (a replicate without a distended patient).
    """
    w = _weights(w, c.true.shape[0])
    tp, pred = w @ c.tp.astype(np.float64), w @ c.pred.astype(np.float64)
    true = w @ c.true.astype(np.float64)
    denom = pred + true[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denom > 0, 2.0 * tp / np.where(denom > 0, denom, 1.0), 0.0)
    return np.where(true > 0, dice.max(axis=1), np.nan)


# ---------------------------------------------------------------------------------------------
# All metrics of one method, intervals, pooling


def replicates(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    w: np.ndarray,
    *,
    val_threshold: float,
    oracle_thresholds: Sequence[float] | np.ndarray,
    kernel: int = 3,
) -> dict[str, np.ndarray]:
    """``[B]`` replicates of ``i_auroc``, ``p_auroc``, ``dice_oracle``, ``dice_oracle_post``, ``dice_val``.

    ``dice_oracle`` is re-optimised over the histogram edges in every replicate, as the oracle is;
    ``dice_oracle_post`` over ``oracle_thresholds`` (pass candidates that include the fold's own
    post-processed oracle threshold, e.g. it plus quantiles of the anomalous pixels' values);
    ``dice_val`` uses the fixed ``val_threshold``. Without maps only ``i_auroc`` is returned.
    """
    out = {"i_auroc": weighted_auroc(scores, labels, w)}
    if maps is None or masks is None:
        return out
    h = pixel_hist(maps, masks)
    pos, neg = _bin_weights(h, w)
    out["p_auroc"] = _auc_from_bins(pos, neg)
    out["dice_oracle"] = _dice_max(pos, neg)
    oracle_t = np.asarray(oracle_thresholds, dtype=np.float64).ravel()
    c = dice_counts(maps, masks, np.r_[val_threshold, oracle_t], kernel)
    out["dice_val"] = weighted_dice(DiceCounts(c.tp[:, :1], c.pred[:, :1], c.true), w)
    if oracle_t.size:
        out["dice_oracle_post"] = weighted_dice(DiceCounts(c.tp[:, 1:], c.pred[:, 1:], c.true), w)
    else:
        out["dice_oracle_post"] = np.full(out["dice_val"].shape, np.nan)
    return out


def interval(estimate: float, replicates: np.ndarray, level: float = 0.95) -> Interval:
    """Percentile interval of the finite ``replicates``; ``se`` is their sample SD (ddof=1).

    Bounds are NaN with fewer than 10 finite replicates (``se`` with fewer than 2).

    >>> r = interval(0.5, np.r_[np.linspace(0, 1, 101), np.nan])
    >>> round(r.low, 6), round(r.high, 6), round(r.se, 4), r.n_valid
    (0.025, 0.975, 0.293, 101)
    """
    r = np.asarray(replicates, dtype=np.float64).ravel()
    f = r[np.isfinite(r)]
    n = int(f.size)
    se = float(f.std(ddof=1)) if n >= 2 else math.nan
    if n < 10:
        low = high = math.nan
    else:
        low, high = (float(v) for v in np.quantile(f, [(1.0 - level) / 2, (1.0 + level) / 2]))
    return Interval(float(estimate), low, high, se, n)


def pooled(replicates_per_fold: Sequence[np.ndarray]) -> np.ndarray:
    """``[B]`` replicate-wise mean over folds; a NaN in any fold makes that replicate NaN.

    Valid both for folds resampled independently (disjoint test sets) and for folds sharing one
    weight matrix (an external set scored by every fold's model): replicate b of each fold uses
    its own, or the shared, draw b, so the mean is a draw of the mean's sampling distribution.
    """
    reps = [np.asarray(r, dtype=np.float64).ravel() for r in replicates_per_fold]
    if not reps:
        raise ValueError("no folds to pool")
    if len({r.size for r in reps}) != 1:
        raise ValueError(f"folds have different replicate counts: {[r.size for r in reps]}")
    return np.mean(np.stack(reps), axis=0)


# ----------------------------------------------------------------------------- detection

_RECALL_GRID = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall thresholds


class DetectionMatches(NamedTuple):
    """Every detection's image, score and COCO match at each IoU threshold (one box per image)."""

    image: np.ndarray  # [D] index of the image each detection belongs to
    score: np.ndarray  # [D]
    tp: np.ndarray  # [T, D] bool: a true positive at threshold t (COCO's greedy match)
    has_gt: np.ndarray  # [N] bool: the image has a ground-truth box
    top1_hit: np.ndarray  # [N] bool: its top-scoring box has IoU >= 0.5
    has_pred: np.ndarray  # [N] bool


def detection_matches(
    gt_boxes: np.ndarray,
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    iou_thresholds: Sequence[float] = (0.5, 0.75),
    max_dets: int = 100,
) -> DetectionMatches:
    """Match detections to the one ground-truth box per image as COCO does (score order, the first
    detection with IoU >= t takes it, the rest are false positives; at most ``max_dets`` per image)."""
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    img, sc, ious = [], [], []
    top1 = np.zeros(len(gt), bool)
    has_pred = np.zeros(len(gt), bool)
    for i, (boxes, scores) in enumerate(predictions):
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        s = np.asarray(scores, np.float64).ravel()
        order = np.argsort(-s, kind="mergesort")[:max_dets]
        b, s = b[order], s[order]
        if np.isfinite(gt[i]).all() and len(b):
            iw = np.clip(np.minimum(b[:, 2], gt[i, 2]) - np.maximum(b[:, 0], gt[i, 0]), 0, None)
            ih = np.clip(np.minimum(b[:, 3], gt[i, 3]) - np.maximum(b[:, 1], gt[i, 1]), 0, None)
            inter = iw * ih
            union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (gt[i, 2] - gt[i, 0]) * (gt[i, 3] - gt[i, 1]) - inter
            iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        else:
            iou = np.zeros(len(b))
        has_pred[i] = len(b) > 0
        top1[i] = bool(len(b)) and iou[0] >= 0.5
        img.append(np.full(len(b), i))
        sc.append(s)
        ious.append(iou)
    image = np.concatenate(img) if img else np.zeros(0, int)
    iou_all = np.concatenate(ious) if ious else np.zeros(0)
    tp = np.zeros((len(iou_thresholds), image.size), bool)
    for t, thr in enumerate(iou_thresholds):
        ok = iou_all >= thr
        # the first qualifying detection of each image (score order within the image) is the match
        first = np.full(len(gt), -1)
        for d in np.flatnonzero(ok)[::-1]:
            first[image[d]] = d
        tp[t, first[first >= 0]] = True
    return DetectionMatches(
        image.astype(np.int64),
        np.concatenate(sc) if sc else np.zeros(0),
        tp,
        np.asarray(np.isfinite(gt).all(1)),
        top1,
        has_pred,
    )


def weighted_ap(m: DetectionMatches, w: np.ndarray) -> np.ndarray:
    """``[B, T]`` COCO average precision (101-point interpolation) at each matched IoU threshold under
    image weights ``w`` ``[B, N]``; NaN where no ground truth has weight."""
    w = _weights(w, m.has_gt.size)
    order = np.argsort(-m.score, kind="mergesort")  # COCO pools every image's detections by score
    wd = w[:, m.image[order]]  # [B, D]
    n_gt = w[:, m.has_gt].sum(1)  # [B]
    out = np.full((w.shape[0], m.tp.shape[0]), np.nan)
    for t in range(m.tp.shape[0]):
        tp_d = m.tp[t, order]
        tps = np.cumsum(wd * tp_d, axis=1)
        fps = np.cumsum(wd * ~tp_d, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rec = tps / n_gt[:, None]
            prec = np.where(tps + fps > 0, tps / np.maximum(tps + fps, 1e-300), 0.0)
        prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]  # precision envelope
        for b in range(w.shape[0]):  # searchsorted is 1-D; D and 101 points are small
            if n_gt[b] <= 0:
                continue
            idx = np.searchsorted(rec[b], _RECALL_GRID, side="left")
            q = np.where(idx < prec.shape[1], prec[b, np.minimum(idx, prec.shape[1] - 1)], 0.0)
            out[b, t] = q.mean()
    return out


def weighted_top1_precision(m: DetectionMatches, w: np.ndarray) -> np.ndarray:
    """``[B]`` share (weighted) of images with a detection whose top box has IoU >= 0.5."""
    w = _weights(w, m.has_gt.size)
    sel = m.has_pred & m.has_gt
    den = w[:, sel].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, w[:, sel & m.top1_hit].sum(1) / den, np.nan)


def detection_replicates(m: DetectionMatches, w: np.ndarray) -> dict[str, np.ndarray]:
    """``{"precision", "map50", "map75"}`` replicates (``m`` matched at IoU 0.5 and 0.75)."""
    ap = weighted_ap(m, w)
    return {"precision": weighted_top1_precision(m, w), "map50": ap[:, 0], "map75": ap[:, 1]}
