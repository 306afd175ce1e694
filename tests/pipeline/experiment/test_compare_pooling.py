"""``compare``'s fair comparison and calibration: every prior-guided row under both pooling rules (rescored
from the same maps), the ECE column with its interval, and methods added to a finished comparison folder."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluation.bootstrap import weighted_auroc, weighted_ece
from evaluation.intervals import fold_weights
from evaluation.metrics import expected_calibration_error, image_auroc
from pipeline.config import Config, ScoreConfig, load_config
from pipeline.experiment.compare import execute_compare, rescored
from pipeline.experiment.fold_eval import EvalSettings, Validation, per_image_scores
from pipeline.run_dirs import RunDirError
from pipeline.shared.calibration import calibrate, fit_calibration
from pipeline.shared.priors import Expansion
from reconstruction.peers import Peer, PeerOutput
from reconstruction.peers.prior_guided import PriorPeer
from tests.helpers import TINY_PHANTOM

IB = "LoRIS-IB (MSGMSD, GMSD's c)"
WHOLE = " · pooled over the whole image"
BOX = "PatchCore (in prior box)"
PADIM = "PaDiM (in prior box)"


# --- the two pooling rules on synthetic maps --------------------------------------------------------


def _maps() -> tuple[np.ndarray, np.ndarray]:
    """Two 16 px maps, bright outside a centred box and dim inside it, so the rules disagree."""
    maps = np.full((2, 16, 16), 3.0, np.float32)
    maps[:, 4:12, 4:12] = 1.0
    maps[1, 6:10, 6:10] = 2.0  # an anomaly inside the inset box of the second map
    return maps, np.array([[4.0, 4.0, 12.0, 12.0]] * 2)


def test_both_pooling_rules_come_from_the_same_maps() -> None:
    maps, boxes = _maps()
    score = ScoreConfig(pooling="mean", region="box", topk_fraction=0.01, inset=1 / 16)
    ev = EvalSettings(("m",), score, 0.0, 3, 10**6, Expansion(0.0, 0.0), "cpu")
    own = {"m": np.array([1.0, 2.0])}  # the box rule as the caller pooled it: the inset box is [5, 11)
    val = Validation(None, {"m": maps[::-1].copy()}, boxes)  # type: ignore[arg-type]
    out = per_image_scores(ev, {"m": maps}, boxes, own, val, "gt")
    whole = maps.reshape(2, -1).mean(1)
    np.testing.assert_array_equal(out["gt/m/score"], own["m"])
    np.testing.assert_allclose(out["gt/m@image/score"], whole)  # the mean of the map over the whole image
    assert not np.allclose(out["gt/m@image/score"], out["gt/m/score"])
    inset = maps[:, 5:11, 5:11].reshape(2, -1).mean(1)
    np.testing.assert_allclose(out["gt/m/val_score"], inset[::-1])  # the validation part, each rule
    np.testing.assert_allclose(out["gt/m@image/val_score"], whole[::-1])
    ev_image = replace(ev, score=replace(score, region="image"))
    moved = per_image_scores(ev_image, {"m": maps}, boxes, {"m": whole}, val, "gt")  # the paper's rule
    np.testing.assert_allclose(moved["gt/m@box/score"], inset)
    assert "gt/m@image/score" not in moved


class _Fixed(Peer):
    """A peer whose full-image map is given: enough to check how a prior peer pools it."""

    name = "fixed"
    defaults = {"no_box": "image"}

    def predict(self, images: np.ndarray, batch_size: int = 16) -> PeerOutput:
        return PeerOutput(np.zeros(len(images), np.float32), _maps()[0])

    def _build(self, size: int) -> Any:
        raise NotImplementedError

    def _fit(self, *args: Any) -> dict:
        raise NotImplementedError

    def _predict(self, x: Any) -> Any:
        raise NotImplementedError


class _FixedBox(PriorPeer, _Fixed):
    pass


def test_a_prior_peer_pools_its_full_map_over_the_whole_image() -> None:
    maps, boxes = _maps()
    out = _FixedBox().predict(np.zeros((2, 16, 16), np.float32), boxes=boxes, inset=1 / 16)
    assert out.maps is not None and float(out.maps[:, 0, 0].max()) == 0.0  # cut to the box
    np.testing.assert_allclose(out.scores, maps[:, 5:11, 5:11].reshape(2, -1).mean(1))
    whole = getattr(out, "image_scores", None)
    np.testing.assert_allclose(whole, maps.reshape(2, -1).mean(1))  # its own map, not the cut one
    assert not np.allclose(whole, out.maps.reshape(2, -1).mean(1))


def test_rescored_rows_equal_a_direct_computation() -> None:
    rng = np.random.default_rng(3)
    labels, val_labels = np.array([0, 0, 0, 1, 1, 0, 1, 0]), np.array([0, 1, 0, 1, 0, 0])
    patients = np.array(["a", "a", "b", "b", "c", "d", "d", "e"])
    kept = {
        "gt/m/score": labels + rng.normal(0, 0.8, 8),
        "gt/m/val_score": val_labels + rng.normal(0, 0.8, 6),
        "gt/m@image/score": rng.normal(0, 1, 8),
        "gt/m@image/val_score": rng.normal(0, 1, 6),
        "gt/m/i_auroc": np.zeros(5),  # a replicate, not a kept score
    }
    w = fold_weights(patients, 0, 0, n_boot=50)
    rows, reps = rescored("gt", kept, val_labels, labels, w)
    assert set(rows) == {"gt/m", "gt/m@image"} and "i_auroc" not in rows["gt/m"]  # run's own I-AUROC stands
    assert rows["gt/m@image"]["i_auroc"] == image_auroc(kept["gt/m@image/score"], labels)
    np.testing.assert_allclose(reps["gt/m@image/i_auroc"], weighted_auroc(kept["gt/m@image/score"], labels, w), 1e-6)
    for row in rows:
        p = calibrate(kept[f"{row}/score"], fit_calibration(kept[f"{row}/val_score"], val_labels))
        assert rows[row]["ece"] == pytest.approx(expected_calibration_error(p, labels), abs=1e-12)
        np.testing.assert_allclose(reps[f"{row}/ece"], weighted_ece(p, labels, w), rtol=1e-6, equal_nan=True)
    # a validation part of one class: no calibration, so no ECE rather than an invented one
    none, _ = rescored("gt", kept, np.zeros(6, int), labels, w)
    assert "ece" not in none["gt/m"] and "ece" not in none["gt/m@image"]


# --- compare end to end ------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("module_cache_env")


def tiny(cache: Path, *more: str) -> Config:
    from scans.phantom import generate_dataset

    held_out = cache / "held-out"
    if not (held_out / "annotations.json").is_file():
        generate_dataset(held_out, n_images=20, n_distended=8, n_patients=8, size=64, seed=11, progress=False)
    sets = [*TINY_PHANTOM, "run_folds=[0]", "unet.epochs=1", f"cache_dir={cache / 'models'}", "threads=2"]
    return replace(
        load_config(profile="quick", overrides=[f"evaluation.external={held_out}", *sets, *more]), progress=False
    )


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("pooling") / "compare"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORIS_CACHE", str(cache))
        execute_compare(tiny(cache), out, "loris,patchcore_box")
    return out


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in json.loads(path.read_text())["rows"] if r["source"] != "paper"}


def _labels(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.shared.data import load_data

    data = load_data(cfg)
    fold = data.folds[0]
    return data.arrays.labels[data.index(fold.val)], data.arrays.labels[data.index(fold.test)]


def test_every_prior_guided_row_under_both_rules(compared: Path, cache: Path) -> None:
    rows = _rows(compared / "table1.json")
    for name in [IB, "LoRIS+MSGMSD", "LoRIS+DD", "LoRIS+GMSD", "LoRIS+SSIM", BOX]:
        own, moved = rows[name], rows[name + WHOLE]
        assert moved["row"] == own["row"] + "@image"
        assert moved["metrics"].get("p_auroc") is None  # pixel figures are the map's, in the row above
        gap = moved["metrics"]["gap_i_auroc"]  # paired against the reference, as every row
        assert gap is not None and gap["ci_low"] <= gap["mean"] <= gap["ci_high"], name
    names = list(rows)
    assert names.index(IB + WHOLE) == names.index(IB) + 1 and names.index(BOX + WHOLE) == names.index(BOX) + 1
    # the rows are the per-image scores the fold kept: the rule's own equals run's I-AUROC, the other differs
    with np.load(compared / "folds" / "0" / "bootstrap.npz") as z:
        kept = {k.replace("|", "/"): z[k] for k in z.files}
    _, test_labels = _labels(tiny(cache))
    ib = rows[IB]["metrics"]["i_auroc"]["mean"]
    assert image_auroc(kept["gt/msgmsd_c170/score"], test_labels) == pytest.approx(ib, abs=1e-12)
    whole = image_auroc(kept["gt/msgmsd_c170@image/score"], test_labels)
    assert rows[IB + WHOLE]["metrics"]["i_auroc"]["mean"] == pytest.approx(whole, abs=1e-12)
    assert not np.allclose(kept["gt/msgmsd_c170/score"], kept["gt/msgmsd_c170@image/score"])
    diffs = {(r["a"], r["b"], r["metric"]) for r in csv.DictReader(open(compared / "differences.csv"))}
    same_rule = ("gt/msgmsd_c170@image", "none/patchcore_box@image", "i_auroc")
    assert {("gt/msgmsd_c170", "none/patchcore_box@image", "i_auroc"), same_rule} <= diffs
    ext = _rows(compared / "external" / "table1.json")
    assert ext[IB + WHOLE]["metrics"]["i_auroc"]["mean"] >= 0 and ext[BOX + WHOLE]["metrics"]["gap_i_auroc"]


def test_ece_column_with_interval_equals_a_direct_computation(compared: Path, cache: Path) -> None:
    assert "| ECE |" in (compared / "table1.md").read_text()
    rows = _rows(compared / "table1.json")
    for name in [IB, IB + WHOLE, BOX, BOX + WHOLE]:
        ece = rows[name]["metrics"]["ece"]
        assert 0.0 <= ece["mean"] <= 1.0 and ece["ci_low"] <= ece["ci_high"], name
    assert rows["Prior only: box area"]["metrics"].get("ece") is None
    with np.load(compared / "folds" / "0" / "bootstrap.npz") as z:
        kept = {k.replace("|", "/"): z[k] for k in z.files}
    val_labels, test_labels = _labels(tiny(cache))
    cal = fit_calibration(kept["gt/msgmsd_c170/val_score"], val_labels)  # the bundle's Platt, on validation
    direct = expected_calibration_error(calibrate(kept["gt/msgmsd_c170/score"], cal), test_labels)
    assert rows[IB]["metrics"]["ece"]["mean"] == pytest.approx(direct, abs=1e-12)
    with open(compared / "table1.csv") as fh:
        assert next(r for r in csv.DictReader(fh) if r["name"] == IB)["ece_ci_high"]


def test_adding_a_method_trains_only_it(compared: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fold, saved = compared / "folds" / "0", compared / "folds" / "0" / "compare" / "patchcore_box.json"
    stamps = {p: p.stat().st_mtime_ns for p in (fold / "fold.json", saved)}
    before = _rows(compared / "table1.json")
    fitted: list[str] = []
    fit = Peer.fit

    def spy(self: Peer, *args: Any, **kwargs: Any) -> dict:
        fitted.append(self.name)
        return fit(self, *args, **kwargs)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a U-Net was retrained")

    monkeypatch.setattr(Peer, "fit", spy)
    monkeypatch.setattr("reconstruction.train.train_unet", boom)
    summary = execute_compare(tiny(cache), compared, "padim_box")  # the same folder, no file moved aside
    assert fitted == ["padim_box"] and summary["added_methods"] == ["padim_box"]
    assert summary["methods"] == ["loris", "patchcore_box", "padim_box"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # read back, not redone
    rows = _rows(compared / "table1.json")
    assert {BOX, BOX + WHOLE, PADIM, PADIM + WHOLE} <= set(rows)
    for name in (IB, BOX, BOX + WHOLE):
        assert rows[name]["metrics"] == before[name]["metrics"]
    assert json.loads((compared / "compare.json").read_text())["methods"] == summary["methods"]


def test_differences_pooled_with_a_held_out_set(compared: Path, cache: Path) -> None:
    from evaluation.intervals import find_difference

    with pytest.raises(ValueError, match="not a held-out set"):
        execute_compare(tiny(cache), compared, "patchcore_box", pool=[cache / "elsewhere"])
    summary = execute_compare(tiny(cache), compared, "patchcore_box", pool=[cache / "held-out"])
    ref, peer = summary["reference"], "none/patchcore_box"
    assert summary["pooled"]["sets"] == ["test folds", summary["external"][0]["report"]]
    d = next(x for x in summary["pooled"]["differences"] if x["a"] == ref and x["b"] == peer)
    test = find_difference(summary["clustered"], ref, peer, "i_auroc")["pooled"]
    ext = find_difference(summary["external"][0]["clustered"], ref, peer, "i_auroc")["pooled"]
    assert d["pooled"]["estimate"] == pytest.approx((test["estimate"] + ext["estimate"]) / 2, abs=1e-12)
    assert [s["estimate"] for s in d["per_set"]] == pytest.approx([test["estimate"], ext["estimate"]], abs=1e-12)
    assert d["per_set"][1]["low"] == pytest.approx(ext["low"], abs=1e-9)  # reordered replicates, same interval
    assert f"| {ref} | {peer} |" in (compared / "pooled.md").read_text()


def test_adding_with_other_settings_is_refused(compared: Path, cache: Path) -> None:
    stamp = (compared / "summary.json").stat().st_mtime_ns
    with pytest.raises(RunDirError, match=r"unet\.epochs \(1 vs 2\)"):
        execute_compare(tiny(cache, "unet.epochs=2"), compared, "uae")
    with pytest.raises(RunDirError, match="budget"):
        execute_compare(tiny(cache), compared, "uae", budget="default")
    with pytest.raises(RunDirError, match="riad"):
        execute_compare(tiny(cache), compared, "riad")
    assert (compared / "summary.json").stat().st_mtime_ns == stamp


def test_a_finished_run_of_another_command_is_not_added_to(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "summary.json").write_text(json.dumps({"detector": "gt"}))  # as `run` finishes a folder
    with pytest.raises(RunDirError, match="not a comparison"):
        execute_compare(tiny(cache), tmp_path, "uae")
