"""DeLong's paired ΔAUROC: exact against the definition, calibrated by simulation, paired by image id."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from evaluation import FoldResult, ImageRow, SourceLabel, summary_from_folds
from evaluation.comparison import prior_comparisons
from evaluation.paired import PairedAuroc, mean_over_folds, mean_over_models, paired_auroc
from evaluation.tables import build_tables, table_markdown

LABELS = {"codetr": SourceLabel("Co-DETR", "codetr")}  # as the pipeline passes it from the registry


def _definition_se(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """DeLong's variance from the Mann-Whitney kernel written out over all (positive, negative) pairs."""
    comps = []
    for s in (a, b):
        pos, neg = s[y == 1][:, None], s[y == 0][None, :]
        psi = (pos > neg) + 0.5 * (pos == neg)
        comps.append((psi.mean(1), psi.mean(0)))
    v10 = np.stack([c[0] for c in comps])
    v01 = np.stack([c[1] for c in comps])
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    return math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])


def test_matches_sklearn_and_the_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    a = np.round(y + rng.normal(0, 1, 60), 1)  # rounding makes ties, within and across classes
    b = np.round(0.5 * a + rng.normal(0, 0.7, 60) + 0.4 * y, 1)
    r = paired_auroc(y, a, b)
    assert r.auroc_a == pytest.approx(roc_auc_score(y, a))
    assert r.auroc_b == pytest.approx(roc_auc_score(y, b))
    assert r.diff == pytest.approx(roc_auc_score(y, b) - roc_auc_score(y, a))
    assert r.se == pytest.approx(_definition_se(y, a, b))
    assert (r.n_pos, r.n_neg) == (int(y.sum()), int((1 - y).sum()))
    assert r.ci_low == pytest.approx(r.diff - 1.959964 * r.se, abs=1e-6)
    assert r.ci_high == pytest.approx(r.diff + 1.959964 * r.se, abs=1e-6)


def test_identical_scorers_differ_by_nothing() -> None:
    y = np.array([0, 1] * 10)
    s = np.linspace(0, 1, 20)
    r = paired_auroc(y, s, s)
    assert r.diff == 0 and r.se == 0 and r.p_value == 1
    perfect = paired_auroc(y, np.full(20, 0.5), y.astype(float))  # against a constant scorer: also se 0
    assert perfect.diff == 0.5 and perfect.se == 0 and perfect.p_value == 0


def test_interval_is_calibrated_under_the_null() -> None:
    """Two correlated scorers of equal AUROC: the 95% interval covers 0 in ~95% of test sets."""
    rng = np.random.default_rng(7)
    covered, diffs, ses = 0, [], []
    trials = 400
    for _ in range(trials):
        y = np.r_[np.zeros(75, int), np.ones(25, int)]  # one phantom test fold's make-up
        shared = rng.normal(0, 1, 100)
        a = y + shared + rng.normal(0, 0.7, 100)
        b = y + shared + rng.normal(0, 0.7, 100)
        r = paired_auroc(y, a, b)
        covered += r.ci_low <= 0 <= r.ci_high
        diffs.append(r.diff)
        ses.append(r.se)
    assert 0.92 <= covered / trials <= 0.98
    assert np.mean(ses) == pytest.approx(np.std(diffs), rel=0.15)


def test_a_real_difference_is_found() -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(200, int), np.ones(100, int)]
    shared = rng.normal(0, 1, 300)
    r = paired_auroc(y, shared + 0.3 * y, shared + 1.5 * y)
    assert r.diff > 0.2 and r.ci_low > 0 and r.p_value < 1e-6


@pytest.mark.parametrize(
    "labels, a, b, match",
    [
        ([0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], "at least 2 positives and 2 negatives"),
        ([0, 0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4], "4 labels but 3 and 4 scores"),
        ([0, 0, 1, 1], [0.1, np.nan, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], "NaN"),
    ],
)
def test_bad_input_is_refused(labels: list[int], a: list[float], b: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_auroc(labels, a, b)


def test_fold_mean_pools_independent_variances() -> None:
    f0 = PairedAuroc(0.9, 0.8, -0.1, 0.03, 0, 0, 0, 20, 80)
    f1 = PairedAuroc(0.7, 0.8, 0.1, 0.04, 0, 0, 0, 25, 75)
    f2 = PairedAuroc(0.8, 0.77, -0.03, 0.0, 0, 0, 0, 25, 75)
    s = mean_over_folds([f0, f1, f2])
    assert s["diff"] == pytest.approx(-0.01)
    assert s["se"] == pytest.approx(0.05 / 3)
    assert s["median_diff"] == pytest.approx(-0.03) and s["folds_b_lower"] == 2
    assert (s["n_pos"], s["n_neg"]) == (70, 230) and len(s["per_fold"]) == 3
    with pytest.raises(ValueError):
        mean_over_folds([])


def _fold(
    k: int, rng: np.random.Generator, with_gt: bool = True
) -> tuple[FoldResult, np.ndarray, np.ndarray, np.ndarray]:
    y = np.array([0, 1] * 6)
    gt = y + rng.normal(0, 0.8, 12)
    det = gt + rng.normal(0, 0.5, 12)
    rows = (
        [
            ImageRow(id=10 * k + i, patient="p", fold=k, label=int(y[i]), prior_source="gt", scores={"msgmsd": gt[i]})
            for i in range(12)
        ]
        if with_gt
        else []
    )
    # The detector's rows come in another order: pairing must go by image id, not position.
    rows += [
        ImageRow(id=10 * k + i, patient="p", fold=k, label=int(y[i]), prior_source="codetr", scores={"msgmsd": det[i]})
        for i in rng.permutation(12)
    ]
    priors = {"codetr": {"i_auroc": roc_auc_score(y, det)}}
    if with_gt:
        priors["gt"] = {"i_auroc": roc_auc_score(y, gt)}
    return FoldResult(k, priors=priors, rows=rows), y, gt, det


def test_report_pairs_rows_by_image_and_shows_the_interval() -> None:
    rng = np.random.default_rng(0)
    made = [_fold(k, rng) for k in range(3)] + [_fold(3, rng, with_gt=False)]
    folds = [m[0] for m in made]
    expected = mean_over_folds([paired_auroc(y, gt, det) for _, y, gt, det in made[:3]])
    got = prior_comparisons(folds)["codetr"]
    assert got["folds"] == [0, 1, 2]  # fold 3 has no ground-truth rows to pair with
    assert got["diff"] == pytest.approx(expected["diff"]) and got["se"] == pytest.approx(expected["se"])
    assert summary_from_folds(folds)["prior_comparison"]["codetr"]["se"] == pytest.approx(expected["se"])
    # Table 2's gap carries the patient-clustered interval when the run has one (tests of
    # evaluation.intervals); DeLong's per-image test stays in summary.json and the note says so.
    row = next(r for r in build_tables(folds, paper=False, labels=LABELS)["table2"] if r["name"] == "Co-DETR")
    assert row["metrics"]["gap_i_auroc"].get("ci_low") is None
    text = table_markdown("table2", build_tables(folds, paper=False, labels=LABELS)["table2"])
    assert "DeLong" in text and "patient-clustered" in text


def test_models_on_shared_images_pool_per_image() -> None:
    """On one shared test set, K copies of the same pair are one comparison, not K independent ones."""
    rng = np.random.default_rng(5)
    y = np.r_[np.zeros(60, int), np.ones(20, int)]
    a = y + rng.normal(0, 1, 80)
    b = a + 0.5 * y + rng.normal(0, 0.5, 80)
    single = paired_auroc(y, a, b)
    one = mean_over_models(y, a[None], b[None])
    assert one["diff"] == pytest.approx(single.diff) and one["se"] == pytest.approx(single.se)
    three = mean_over_models(y, np.stack([a] * 3), np.stack([b] * 3))
    assert three["se"] == pytest.approx(single.se)  # fully correlated: no narrowing
    assert mean_over_folds([single] * 3)["se"] == pytest.approx(single.se / math.sqrt(3))  # would be too narrow
    # Different models on the same images: the mean difference's components are the mean of theirs.
    b2 = a + 0.2 * y + rng.normal(0, 0.5, 80)
    mixed = mean_over_models(y, np.stack([a, a]), np.stack([b, b2]))
    assert mixed["diff"] == pytest.approx((single.diff + paired_auroc(y, a, b2).diff) / 2)
    assert [f["diff"] for f in mixed["per_fold"]] == pytest.approx([single.diff, paired_auroc(y, a, b2).diff])
    with pytest.raises(ValueError, match="must both be"):
        mean_over_models(y, np.stack([a, a]), b[None])


def test_report_recognises_an_external_test_set() -> None:
    rng = np.random.default_rng(2)
    y = np.array([0, 1] * 8)
    gt = [y + rng.normal(0, 0.8, 16) for _ in range(2)]
    det = [g + rng.normal(0, 0.5, 16) for g in gt]
    folds = [
        FoldResult(
            k,
            rows=[
                ImageRow(
                    id=i, patient="p", fold=k, label=int(y[i]), prior_source=src, scores={"msgmsd": float(sc[k][i])}
                )
                for src, sc in (("gt", gt), ("codetr", det))
                for i in range(16)
            ],
        )
        for k in range(2)
    ]
    got = prior_comparisons(folds)["codetr"]
    expected = mean_over_models(y, np.stack(gt), np.stack(det))
    assert got["test_images"] == "shared" and got["se"] == pytest.approx(expected["se"])


def test_a_fold_delong_cannot_test_keeps_the_plain_gap() -> None:
    rng = np.random.default_rng(4)
    folds = [_fold(k, rng)[0] for k in range(2)]
    lonely = folds[1]  # leave one distended image: AUROC exists, DeLong's variance does not
    positives = [r.id for r in lonely.rows if r.label == 1 and r.prior_source == "gt"]
    lonely.rows = [r for r in lonely.rows if r.label == 0 or r.id == positives[0]]
    assert prior_comparisons(folds)["codetr"]["folds"] == [0]
    row = next(r for r in build_tables(folds, paper=False, labels=LABELS)["table2"] if r["name"] == "Co-DETR")
    assert "ci_low" not in row["metrics"]["gap_i_auroc"]
