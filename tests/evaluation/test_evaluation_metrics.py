"""Metrics checked against scikit-learn on constructed cases with known answers."""

from __future__ import annotations

import doctest
import importlib

import cv2
import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from evaluation.metrics import (
    aggregate,
    dice_oracle,
    dice_per_image,
    dice_val,
    image_auroc,
    per_image_dice,
    pixel_auroc,
    pixel_auroc_streaming,
    pooled_dice,
    select_threshold,
)
from scans.morphology import close_open


def _fake(n: int = 12, size: int = 48, seed: int = 0, blur: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Maps with elliptic pockets on every other image; noise makes AUROC and Dice non-trivial."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(1, n, 2):
        c = (int(rng.integers(12, size - 12)), int(rng.integers(12, size - 12)))
        cv2.ellipse(masks[i], c, (int(rng.integers(4, 10)), int(rng.integers(3, 7))), 0, 0, 360, 1, -1)
    maps = rng.random((n, size, size)).astype(np.float32) + 0.6 * masks
    if blur:
        maps = np.stack([cv2.blur(m, (3, 3)) for m in maps])
    return maps, masks.astype(bool)


@pytest.mark.parametrize(
    "module",
    [
        "evaluation.metrics",
        "evaluation.detection",
        "evaluation.aggregate",
        "evaluation.figures",
        "evaluation.report",
        "evaluation.paired",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


# ----------------------------------------------------------------------------- image AUROC


def test_image_auroc_known_cases() -> None:
    y = np.array([0, 0, 0, 1, 1])
    assert image_auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), y) == 1.0
    assert image_auroc(np.array([0.9, 0.8, 0.7, 0.2, 0.1]), y) == 0.0
    assert image_auroc(np.full(5, 0.5), y) == 0.5  # all tied
    assert image_auroc(np.array([0.1, 0.5, 0.3, 0.5, 0.9]), y) == pytest.approx(5.5 / 6)  # one tie
    rng = np.random.default_rng(1)
    s, y = rng.random(200), rng.integers(0, 2, 200)
    assert image_auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_image_auroc_one_class_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="both classes"):
        image_auroc(np.array([0.1, 0.2]), np.array([1, 1]))


# ----------------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_known_cases_and_sklearn() -> None:
    maps, masks = _fake()
    assert pixel_auroc(masks.astype(float), masks) == 1.0
    assert pixel_auroc(-masks.astype(float), masks) == 0.0
    assert pixel_auroc(np.zeros(masks.shape), masks) == 0.5
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    with pytest.raises(ValueError, match="both"):
        pixel_auroc(maps, np.zeros_like(masks))


@pytest.mark.parametrize("kind", ["smooth", "uniform_noise", "dd_like_zeros", "quantised", "heavy_tail", "constant"])
def test_streaming_pixel_auroc_within_stated_bound(kind: str) -> None:
    maps, masks = _fake(n=16, size=64, seed=3)
    rng = np.random.default_rng(4)
    if kind == "uniform_noise":
        maps = rng.random(maps.shape) + 0.05 * masks
    elif kind == "dd_like_zeros":  # max(recon - orig, 0): most pixels exactly 0
        maps = np.maximum(maps - 0.9, 0.0)
    elif kind == "quantised":  # 8-bit maps: many ties inside one bin
        maps = np.round(maps * 255) / 255
    elif kind == "heavy_tail":  # one huge outlier squeezes the bulk into few bins
        maps = maps.astype(np.float64)
        maps[0, 0, 0] = 1e6
    elif kind == "constant":
        maps = np.ones(maps.shape)
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    approx, bound = pixel_auroc_streaming(maps, masks, chunk=5)
    assert abs(approx - exact) <= bound + 1e-12
    if kind in ("smooth", "uniform_noise", "dd_like_zeros", "quantised"):
        assert bound < 1e-4  # the figure stated in the docstring
    # the dispatcher switches to streaming above its size threshold
    assert pixel_auroc(maps, masks, max_exact_pixels=0) == pytest.approx(approx)


def test_streaming_accepts_a_list_of_images() -> None:
    maps, masks = _fake()
    a, _ = pixel_auroc_streaming(list(maps), list(masks))
    assert a == pytest.approx(pixel_auroc_streaming(maps, masks)[0])


# ----------------------------------------------------------------------------- Dice


def test_dice_oracle_is_max_f1_of_sklearn_pr_curve() -> None:
    maps, masks = _fake(seed=5)
    p, r, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    f1 = np.max(np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0))
    res = dice_oracle(maps, masks)
    assert res.dice == pytest.approx(f1, abs=1e-9)
    assert pooled_dice(maps, masks, res.threshold, kernel=1) == pytest.approx(res.dice, abs=1e-12)


def test_dice_known_cases() -> None:
    _, masks = _fake()
    assert dice_oracle(masks * 1.0, masks).dice == 1.0
    assert dice_oracle(masks * 1.0, masks, kernel=3).dice == pytest.approx(
        pooled_dice(masks * 1.0, masks, 1.0, kernel=3)
    )
    # inverted: the best the oracle can do is to predict everything
    inv = dice_oracle(-(masks * 1.0), masks)
    assert inv.dice == pytest.approx(2 * masks.sum() / (masks.size + masks.sum()))
    # constant map: one threshold, everything predicted
    assert dice_oracle(np.zeros(masks.shape), masks).dice == pytest.approx(inv.dice)
    with pytest.raises(ValueError, match="anomalous pixel"):
        select_threshold(np.zeros(masks.shape), np.zeros_like(masks))


def test_post_processed_search_is_close_to_brute_force() -> None:
    maps, masks = _fake(n=6, size=32, seed=7)
    res = select_threshold(maps, masks, kernel=3)
    assert pooled_dice(maps, masks, res.threshold, kernel=3) == pytest.approx(res.dice)
    brute = max(
        2 * (close_open(maps >= t) & masks).sum() / (close_open(maps >= t).sum() + masks.sum())
        for t in np.unique(maps[masks])
    )
    assert res.dice <= brute + 1e-12
    assert res.dice >= brute - 0.02


def test_dice_val_never_looks_at_test_masks() -> None:
    val_maps, val_masks = _fake(seed=11)
    test_maps, test_masks = _fake(seed=12)
    a = dice_val(val_maps, val_masks, test_maps, test_masks)
    rng = np.random.default_rng(0)
    for perturbed in (~test_masks, np.zeros_like(test_masks) | (rng.random(test_masks.shape) < 0.3)):
        b = dice_val(val_maps, val_masks, test_maps, perturbed)
        assert b.threshold == a.threshold
        assert b.dice != a.dice  # the masks are used, but only to score
    # and the threshold is the validation optimum after closing-opening
    assert a.threshold == select_threshold(val_maps, val_masks, kernel=3).threshold
    assert a.dice == pytest.approx(pooled_dice(test_maps, test_masks, a.threshold, kernel=3))


def test_per_image_dice_known_answer() -> None:
    masks = np.zeros((3, 10, 10), bool)
    masks[1, 2:6, 2:6] = True  # 16 px
    masks[2, 2:6, 2:6] = True
    maps = np.zeros((3, 10, 10))
    maps[1, 2:6, 2:6] = 1.0  # exact
    maps[2, 2:6, 2:4] = 1.0  # 8 of 16 px -> 2*8/(8+16)
    d = per_image_dice(maps, masks, 0.5, kernel=1)
    assert np.isnan(d[0]) and d[1] == 1.0 and d[2] == pytest.approx(16 / 24)
    assert dice_per_image(maps, masks, np.array([0, 1, 1]), 0.5, kernel=1) == pytest.approx((1 + 16 / 24) / 2)
    with pytest.raises(ValueError, match="distended"):
        dice_per_image(maps, masks, np.zeros(3), 0.5)


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_known_numbers() -> None:
    out = aggregate([{"a": 0.7, "b": 1.0}, {"a": 0.8, "b": float("nan")}, {"a": 0.9}])
    assert out["a"]["mean"] == pytest.approx(0.8)
    assert out["a"]["std"] == pytest.approx(0.1)  # ddof=1: sqrt(0.02 / 2)
    assert out["a"]["n"] == 3 and out["a"]["ddof"] == 1
    assert out["b"]["mean"] == 1.0 and out["b"]["n"] == 1 and np.isnan(out["b"]["std"])


def test_close_open_keeps_masks_touching_the_border() -> None:
    from scans.morphology import close_open

    m = np.zeros((1, 8, 8), bool)
    m[0, :3, :] = True  # a band along the top edge
    assert np.array_equal(close_open(m, 3), m)


def test_dice_per_image_skips_undefined_images() -> None:
    masks = np.zeros((3, 8, 8), bool)
    masks[1, 2:6, 2:6] = True  # image 2 is distended but its mask is empty (e.g. clipped by the box)
    maps = masks * 1.0
    assert dice_per_image(maps, masks, np.array([0, 1, 1]), 0.5, kernel=1) == 1.0
