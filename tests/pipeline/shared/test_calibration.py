"""The probability of distension ``predict`` writes: Platt scaling of the image score fitted on the bundle's
validation part (bundle.json ``calibration``), the ``probability`` column of both engines, bundles made
before it, and the expected calibration error (plain and patient-bootstrap weighted)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation.bootstrap import patient_weights, weighted_ece
from evaluation.metrics import expected_calibration_error
from pipeline.__main__ import main
from pipeline.serve.bundle import Bundle
from pipeline.serve.bundle_file import check_bundle_doc
from pipeline.serve.predict import PRED_FIELDS
from pipeline.shared.calibration import calibrate, fit_calibration
from tests.helpers import train_quick_bundle


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --- Platt scaling -------------------------------------------------------------------------------


def test_platt_recovers_a_known_logistic_relation() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(0.4, 0.25, 20_000)  # raw score units, not standardised
    a, b = 6.0, -2.5
    labels = (rng.random(scores.size) < _sigmoid(a * scores + b)).astype(np.int64)
    c = fit_calibration(scores, labels)
    assert c["method"] == "platt" and c["n"] == 20_000 and c["n_distended"] == int(labels.sum())
    assert abs(c["a"] - a) < 0.4 and abs(c["b"] - b) < 0.2, c
    grid = np.linspace(scores.min(), scores.max(), 50)
    # the documented formula is what calibrate computes, and it is close to the true relation
    np.testing.assert_allclose(calibrate(grid, c), _sigmoid(c["a"] * grid + c["b"]), rtol=1e-12)
    assert np.max(np.abs(calibrate(grid, c) - _sigmoid(a * grid + b))) < 0.03
    assert 0.0 <= c["ece_validation"] < 0.02


def test_platt_is_monotone_finite_and_honest_with_few_scans() -> None:
    # one distended scan of eight, separated from the rest: finite, rising, and not a certainty
    scores = np.array([0.1, 0.15, 0.2, 0.22, 0.3, 0.31, 0.35, 0.9])
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1])
    c = fit_calibration(scores, labels)
    assert c["method"] == "platt" and np.isfinite([c["a"], c["b"]]).all() and c["a"] > 0
    p = calibrate(np.sort(scores), c)
    assert np.all(np.diff(p) > 0) and 0.0 < p[0] and p[-1] < 1.0
    # scores that rank normal scans above distended ones: flat at the (smoothed) prevalence, never falling
    c = fit_calibration(-scores, labels)
    assert c["a"] == 0.0 and np.allclose(calibrate(scores, c), calibrate(scores, c)[0])
    assert 0.1 < float(calibrate(np.zeros(1), c)[0]) < 0.2  # 1/8 distended, Platt's targets pull it to ~0.14
    # all scores equal: the same
    assert fit_calibration(np.full(5, 0.3), np.array([0, 1, 0, 0, 1]))["a"] == 0.0
    # one class only: no calibration, and no probability invented
    for one in (np.zeros(4, int), np.ones(4, int)):
        c = fit_calibration(scores[:4], one)
        assert c["method"] == "none" and c["n"] == 4 and "reason" in c and "a" not in c
        assert np.isnan(calibrate(scores[:4], c)).all()
    assert np.isnan(calibrate(scores, None)).all()
    # extreme scores stay in [0, 1] without overflow warnings
    with np.errstate(all="raise"):
        assert calibrate(np.array([-1e6, 1e6]), {"method": "platt", "a": 5.0, "b": 0.0}).tolist() == [0.0, 1.0]


def test_bundle_doc_check_validates_the_calibration(tmp_path: Path) -> None:
    doc = _minimal_doc()
    path = tmp_path / "bundle.json"
    check_bundle_doc(doc, path)  # no calibration: a bundle from before it
    check_bundle_doc({**doc, "calibration": {"method": "platt", "a": 2.0, "b": -1.0}}, path)
    check_bundle_doc({**doc, "calibration": {"method": "none", "reason": "x", "n": 3, "n_distended": 0}}, path)
    bad = [
        ({"method": "platt", "a": float("nan"), "b": 0.0}, "calibration.a"),
        ({"method": "platt", "a": -1.0, "b": 0.0}, "calibration.a"),
        ({"method": "platt", "a": 1.0, "b": float("inf")}, "calibration.b"),
        ({"method": "platt", "a": 1.0}, "calibration.b"),
        ({"method": "isotonic"}, "calibration.method"),
        ([1, 2], "calibration"),
    ]
    for cal, key in bad:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            check_bundle_doc({**doc, "calibration": cal}, path)


def test_bundle_doc_keeps_the_bytes_train_wrote_at_fab532e() -> None:
    import hashlib
    import json

    from detectors.prior import PriorPolicy
    from pipeline.config import load_config
    from pipeline.serve.bundle_file import BundleDoc
    from pipeline.serve.train import Thresholds, bundle_doc

    cfg = load_config(None, "quick", ["image_size=32"])
    cal = {"method": "platt", "a": 1.5, "b": -0.25, "n": 6, "n_distended": 3, "ece_validation": 0.1}
    doc = bundle_doc(
        cfg, PriorPolicy(0.05, (4.0, 8.0, 28.0, 16.0)), Thresholds(0.1, {"sensitivity": 1.0}, 0.05, 0.5, cal)
    )
    text = json.dumps(doc, indent=1)
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "1358ea1eeb2fba8e"  # bundle_doc's bytes at fab532e
    assert json.dumps(BundleDoc.from_dict(json.loads(text)).to_dict(), indent=1) == text
    assert BundleDoc.from_dict(_minimal_doc()).to_dict() == _minimal_doc()


def _minimal_doc() -> dict[str, object]:
    """A valid bundle.json without calibration, from the code that writes one."""
    from detectors.prior import PriorPolicy
    from pipeline.config import load_config
    from pipeline.serve.train import Thresholds, bundle_doc

    cfg = load_config(None, "quick", ["image_size=32"])
    return bundle_doc(cfg, PriorPolicy(0.05, (4.0, 8.0, 28.0, 16.0)), Thresholds(0.1, {}, 0.05, 0.0))


# --- expected calibration error ------------------------------------------------------------------


def _ece_by_loop(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        sel = (p >= lo) & ((p < hi) if k < n_bins - 1 else (p <= hi))
        if sel.any():
            total += sel.sum() / p.size * abs(p[sel].mean() - y[sel].mean())
    return total


def test_ece_is_small_when_calibrated_and_large_when_not() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(50_000)
    y = (rng.random(p.size) < p).astype(np.int64)
    assert expected_calibration_error(p, y) < 0.01
    over = np.clip(0.5 + 2 * (p - 0.5), 0, 1)  # overconfident: pushed towards 0 and 1 (ECE ~1/8)
    assert expected_calibration_error(over, y) > 0.1
    assert expected_calibration_error(p**3, y) > 0.2  # underestimates distension (ECE ~1/4)
    assert expected_calibration_error(1 - p, y) > 0.4  # upside down
    for probs in (p[:300], over[:300], np.r_[0.0, 1.0, p[:50]]):
        y_part = y[: probs.size]
        assert expected_calibration_error(probs, y_part) == pytest.approx(_ece_by_loop(probs, y_part), abs=1e-12)
        assert expected_calibration_error(probs, y_part, n_bins=4) == pytest.approx(
            _ece_by_loop(probs, y_part, 4), abs=1e-12
        )
    for probs, labels in ((np.array([np.nan]), np.array([1])), (np.array([1.2]), np.array([1]))):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            expected_calibration_error(probs, labels)
    with pytest.raises(ValueError):
        expected_calibration_error(np.array([0.2, 0.3]), np.array([0, 2]))


def test_weighted_ece_matches_the_repeated_data() -> None:
    rng = np.random.default_rng(2)
    patients = np.repeat([f"p{i}" for i in range(8)], 4)
    p = rng.random(patients.size)
    y = (rng.random(p.size) < p).astype(np.int64)
    w = patient_weights(patients, 20, rng)
    got = weighted_ece(p, y, w)
    assert got.shape == (20,)
    for b in range(20):
        reps = w[b].astype(int)
        assert got[b] == pytest.approx(expected_calibration_error(np.repeat(p, reps), np.repeat(y, reps)), abs=1e-12)
    assert weighted_ece(p, y, np.ones((1, p.size)))[0] == pytest.approx(expected_calibration_error(p, y), abs=1e-12)
    assert np.isnan(weighted_ece(p, y, np.zeros((1, p.size)))[0])


# --- a trained bundle, predict and both engines ----------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A quick bundle (tiny phantom) and a folder of some of its phantom scans."""
    bundle, cache = train_quick_bundle(tmp_path_factory)
    folder = tmp_path_factory.mktemp("scans")
    pngs = sorted((cache / "phantom").rglob("*.png"))
    for i, png in enumerate(pngs[:: max(len(pngs) // 8, 1)][:8]):
        shutil.copy(png, folder / f"s{i}.png")
    noise = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    cv2.imwrite(str(folder / "noise.png"), noise)  # a high score, most likely
    return bundle, folder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _predict(model: Path, folder: Path, out: Path) -> list[dict[str, str]]:
    args = ["predict", "--model", str(model), "--input", str(folder), "--out", str(out), "--no-progress"]
    assert main([*args, "--no-review"]) == 0
    return _rows(out / "predictions.csv")


def _images(folder: Path, size: int) -> np.ndarray:
    scans = [np.asarray(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)) for p in sorted(folder.glob("*.png"))]
    return np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_AREA) for s in scans]).astype(np.float32) / 255


def test_train_writes_calibration_and_predict_writes_probability(trained: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, folder = trained
    doc = json.loads((bundle / "bundle.json").read_text())
    cal = doc["calibration"]
    val = doc["score"]["validation"]
    assert cal["method"] == "platt", cal  # train refuses a validation part of one class (its I-AUROC)
    assert (cal["n"], cal["n_distended"]) == (val["n"], val["n_distended"])
    assert np.isfinite([cal["a"], cal["b"]]).all() and cal["a"] >= 0 and 0 <= cal["ece_validation"] <= 1
    rows = _predict(bundle, folder, tmp_path / "out")
    assert list(rows[0]) == PRED_FIELDS and PRED_FIELDS.index("probability") == PRED_FIELDS.index("score") + 1
    assert len(rows) == len(list(folder.glob("*.png")))
    score = np.array([float(r["score"]) for r in rows])
    prob = np.array([float(r["probability"]) for r in rows])
    assert np.all((prob >= 0) & (prob <= 1))
    order = np.argsort(score, kind="stable")
    assert np.all(np.diff(prob[order]) >= 0)  # monotone in the score (four decimals may tie)
    np.testing.assert_allclose(prob, calibrate(score, cal), atol=6e-5)
    for r in rows:  # the verdict is still the raw score against the threshold (to the CSV's six digits)
        s, t = float(r["score"]), float(r["threshold"])
        if abs(s - t) > 1e-5 * max(abs(t), 1e-12):  # a validation scan may sit on the threshold itself
            assert r["verdict"] == ("distended" if s >= t else "not distended")


def test_onnxruntime_gives_the_same_probabilities(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from pipeline.serve.onnx_bundle import load_onnx_bundle

    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))  # the export goes to this test's cache
    bundle, folder = trained
    tb = Bundle.load(bundle, device="cpu")
    ob = load_onnx_bundle(bundle, threads=2)
    images = _images(folder, tb.image_size)
    want, got = tb.process(images), ob.process(images)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4, rtol=0)
    assert np.isfinite(want.probabilities).all()
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(want.probabilities, calibrate(want.scores, tb.calibration))


def test_a_bundle_without_calibration_still_predicts(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, folder = trained
    new = _predict(bundle, folder, tmp_path / "new")
    for name, change in (("old", None), ("one-class", {"method": "none", "reason": "no distended scan"})):
        old = tmp_path / name
        shutil.copytree(bundle, old, ignore=shutil.ignore_patterns("work"))
        doc = json.loads((old / "bundle.json").read_text())
        del doc["calibration"]
        if change:
            doc["calibration"] = {**change, "n": 5, "n_distended": 0}
        (old / "bundle.json").write_text(json.dumps(doc))
        capsys.readouterr()
        rows = _predict(old, folder, tmp_path / f"{name}-out")
        assert "no calibration" in capsys.readouterr().err
        assert [r["probability"] for r in rows] == [""] * len(new)
        for a, b in zip(rows, new):
            assert (a["file"], a["score"], a["verdict"]) == (b["file"], b["score"], b["verdict"])
