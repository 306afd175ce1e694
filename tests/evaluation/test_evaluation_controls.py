"""Prior-only controls, clustered intervals of table rows and paired differences, score-region margin."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.controls import CONTROLS, box_indicator, control_scores
from evaluation.intervals import best_control, clustered_summary, difference, find_difference, fold_estimates
from evaluation.metrics import segmentation_metrics


def test_controls_read_the_box_only() -> None:
    boxes = np.array([[10.0, 20.0, 50.0, 30.0], [10.0, 15.0, 50.0, 35.0], [np.nan] * 4])
    s = control_scores(boxes)
    assert s["control_height"].tolist() == [10.0, 20.0, 0.0]
    assert s["control_area"].tolist() == [400.0, 800.0, 0.0]
    ind = box_indicator(boxes, 64, 64, margin=2)
    assert ind[0].sum() == (40 + 4) * (10 + 4) and ind[2].sum() == 0
    # the indicator is the pixels LoRIS masks, margin included
    from reconstruction.masking import box_masks

    assert np.array_equal(ind.astype(bool), box_masks(boxes, 64, 64, 2)[:, 0].numpy())


def test_a_class_dependent_box_is_caught_by_its_control() -> None:
    """Taller boxes on distended scans: the height control alone separates the classes."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30, int), np.ones(10, int)]
    h = 20 + 8 * labels + rng.normal(0, 1, 40)
    boxes = np.stack([np.full(40, 10.0), 40 - h, np.full(40, 50.0), np.full(40, 40.0)], 1)
    masks = np.zeros((40, 64, 64), bool)
    masks[labels == 1, 20:38, 15:45] = True
    ind = box_indicator(boxes, 64, 64)
    m = segmentation_metrics(control_scores(boxes)["control_height"], labels, ind, masks, ind, masks)
    assert m["i_auroc"] > 0.95 and m["p_auroc"] > 0.9


def _fake_fold(rng: np.random.Generator, shift: float) -> tuple[dict, dict]:
    reps = {
        f"gt/{r}/i_auroc": rng.normal(v + shift, 0.03, 400).astype(np.float32)
        for r, v in (("msgmsd", 0.8), ("dd", 0.7), ("control_height", 0.55), ("control_area", 0.6))
    }
    reps["none/riad/i_auroc"] = rng.normal(0.6, 0.03, 400).astype(np.float32)
    methods = {"msgmsd": {"i_auroc": 0.8 + shift}, "dd": {"i_auroc": 0.7 + shift}, "riad": {"i_auroc": 0.6}}
    controls = {"gt": {"control_height": {"i_auroc": 0.55 + shift}, "control_area": {"i_auroc": 0.6 + shift}}}
    return fold_estimates(methods, {"gt": methods["msgmsd"]}, controls, "gt"), reps


def test_clustered_summary_rows_differences_and_best_control() -> None:
    rng = np.random.default_rng(1)
    folds = [_fake_fold(rng, s) for s in (0.0, 0.02, -0.02)]
    est, reps = [f[0] for f in folds], [f[1] for f in folds]
    assert best_control(est, "gt") == "gt/control_area"
    cl = clustered_summary(est, reps, main_source="gt")
    assert cl["rows"]["gt/msgmsd"]["i_auroc"]["pooled"]["estimate"] == pytest.approx(0.8)
    assert len(cl["rows"]["gt/msgmsd"]["i_auroc"]["per_fold"]) == 3
    d = find_difference(cl, "gt/msgmsd", "gt/control_area", "i_auroc")
    assert d is not None and d["pooled"]["estimate"] == pytest.approx(0.2) and d["pooled"]["low"] > 0.1
    assert find_difference(cl, "gt/msgmsd", "none/riad", "i_auroc") is not None
    assert find_difference(cl, "gt/msgmsd", "gt/dd", "i_auroc") is not None
    # pooling over 3 folds narrows the interval against one fold's
    one = d["per_fold"][0]
    assert d["pooled"]["high"] - d["pooled"]["low"] < one["high"] - one["low"]


def test_difference_is_paired_replicate_wise() -> None:
    """Two rows that move together on every replicate differ by a constant: a zero-width interval."""
    base = np.random.default_rng(2).normal(0.7, 0.05, 500)
    reps = [{"gt/a/i_auroc": base + 0.05, "gt/b/i_auroc": base}]
    est = [{"gt/a": {"i_auroc": 0.75}, "gt/b": {"i_auroc": 0.7}}]
    d = difference(est, reps, "gt/a", "gt/b", "i_auroc")
    assert d is not None and d["pooled"]["high"] - d["pooled"]["low"] < 1e-9
    assert difference(est, reps, "gt/a", "gt/missing", "i_auroc") is None


def test_score_region_box_pools_over_the_masked_margin() -> None:
    from pipeline.config import load_config
    from pipeline.shared.scoring import image_scores
    from reconstruction.deviation import image_score

    cfg = load_config(None, "quick", ["score.region=box", "score.inset=0", "unet.mask_margin=3"])
    maps = np.zeros((1, 32, 32), np.float32)
    maps[0, 5, 5] = 1.0  # just outside the box, inside its 3-px margin
    boxes = np.array([[7.0, 7.0, 20.0, 20.0]])
    got = image_scores({"m": maps}, boxes, cfg.score, cfg.unet.mask_margin)["m"]
    assert got[0] > 0 and got[0] == pytest.approx(image_score(maps, boxes, region="box", margin=3)[0])


def test_controls_listed_once() -> None:
    assert set(CONTROLS) == set(control_scores(np.zeros((1, 4))).keys())


def test_full_weights_reproduce_every_estimate() -> None:
    """A replicate with every image weighted once is the estimate itself, post-processed oracle included."""
    from evaluation.intervals import row_replicates

    rng = np.random.default_rng(3)
    masks = np.zeros((12, 32, 32), bool)
    masks[6:, 10:20, 8:24] = True
    maps = rng.random((12, 32, 32)).astype(np.float32) * 0.6 + masks * rng.random((12, 32, 32)) * 0.8
    labels = np.r_[np.zeros(6, int), np.ones(6, int)]
    scores = maps.mean((1, 2))
    m = segmentation_metrics(scores, labels, maps, masks, maps, masks)
    reps = row_replicates("gt", "x", m, scores, labels, maps, masks, np.ones((1, 12)), kernel=3)
    for k in ("i_auroc", "dice_oracle_post", "dice_val"):
        assert reps[f"gt/x/{k}"][0] == pytest.approx(m[k], abs=1e-6), k
    assert reps["gt/x/p_auroc"][0] == pytest.approx(m["p_auroc"], abs=5e-3)


def test_too_few_patients_give_no_interval() -> None:
    from evaluation.controls import CONTROL_NAMES  # noqa: F401  (import check)
    from evaluation.intervals import fold_weights
    from evaluation.tables import cell

    w = fold_weights(np.array(["a", "a", "b", "b"]), seed=0, fold=0, n_boot=50)
    assert np.isnan(w).all()
    assert fold_weights(np.array(["a", "b", "c"]), seed=0, fold=0, n_boot=50).shape == (50, 3)
    assert cell({"mean": 0.7, "std": 0.1, "ci_low": float("nan"), "ci_high": float("nan")}) == "0.700 ± 0.100"
