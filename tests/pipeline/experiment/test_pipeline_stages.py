import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detectors.base import DETECTORS, Detections, Detector, register
from detectors.gt import GtDetector
from detectors.prior import PriorPolicy
from pipeline.config import Config, load_config
from pipeline.shared.data import Data
from pipeline.shared.models import fit_detector
from pipeline.shared.priors import Expansion, expand_all, predict_priors
from scans.dataset import load_dataset, to_arrays
from scans.folds import make_folds
from tests.helpers import make_dataset


class Recorder(Detector):
    seen: list[np.ndarray] = []

    def __init__(self, **config: Any) -> None:
        pass

    def fit(self, train, val, workdir):  # type: ignore[no-untyped-def]
        Recorder.seen = [train.labels.copy(), val.labels.copy()]
        return {}

    def predict(self, images: np.ndarray) -> list[Detections]:
        return [Detections(np.zeros((0, 4)), np.zeros(0)) for _ in images]

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)

    @classmethod
    def load(cls, directory: Path) -> "Recorder":
        return cls()


@pytest.fixture()
def data(tmp_path: Path) -> Data:
    make_dataset(tmp_path / "d", n_patients=10, per_patient=4)
    scans = load_dataset(tmp_path / "d")
    return Data(tmp_path / "d", scans, to_arrays(scans, 64), make_folds(scans, k=3), "test")


@pytest.mark.parametrize("classes,expect_distended", [("normal", False), ("all", True)])
def test_detector_training_sees_distended_only_when_opted_in(
    tmp_path: Path, data: Data, classes: str, expect_distended: bool
) -> None:
    register("recorder")(Recorder)
    try:
        sets = [f"detector.train_classes={classes}", f"cache_dir={tmp_path / 'c'}", "detector.name=recorder"]
        cfg = load_config(None, "quick", sets)
        fold = data.folds[0]
        fit_detector(cfg, data, data.index(fold.train), data.index(fold.val), tmp_path / "w")
        train_labels, val_labels = Recorder.seen
        assert bool((train_labels == 1).any() or (val_labels == 1).any()) is expect_distended
        assert (data.arrays.labels[data.index(fold.train)] == 1).any()  # the fold did hold distended scans
    finally:
        DETECTORS.pop("recorder", None)


def test_no_detection_falls_back_to_median_training_box(data: Data) -> None:
    arr = data.arrays
    policy = PriorPolicy(0.5, PriorPolicy.median_of(arr.boxes, 64, 64))
    pri = predict_priors(Recorder(), arr.subset([0, 1, 2]), policy, Expansion(up=0.0))
    assert pri.sources == ["fallback"] * 3 and pri.fallbacks == 3
    np.testing.assert_allclose(pri.boxes[0], np.median(arr.boxes, axis=0), rtol=1e-5)


def test_expansion_is_applied_to_priors_and_training_boxes_alike(data: Data) -> None:
    arr = data.arrays
    policy = PriorPolicy(0.5, PriorPolicy.median_of(arr.boxes, 64, 64))
    pri = predict_priors(GtDetector(), arr.subset([0]), policy, Expansion(up=0.5))
    grown = expand_all(arr.boxes[:1], Expansion(up=0.5), 64)
    np.testing.assert_allclose(pri.boxes, grown)
    h = arr.boxes[0, 3] - arr.boxes[0, 1]
    assert grown[0, 1] == pytest.approx(max(0.0, arr.boxes[0, 1] - 0.5 * h)) and grown[0, 3] == arr.boxes[0, 3]


def test_refiner_trains_on_the_detector_scans_is_cached_and_can_be_switched_off(tmp_path: Path, data: Data) -> None:
    from detectors.refine import RefinedDetector

    register("recorder")(Recorder)
    try:
        cfg = load_config(None, "quick", [f"cache_dir={tmp_path / 'c'}", "detector.name=recorder"])
        fold = data.folds[0]
        tr, va = data.index(fold.train), data.index(fold.val)
        det, info = fit_detector(cfg, data, tr, va, tmp_path / "w")
        assert isinstance(det, RefinedDetector) and isinstance(det.base, Recorder)
        assert info["refiner"]["cached"] is False
        assert info["refiner"]["n_train"] == int((data.arrays.labels[tr] == 0).sum())  # normal scans only
        # An inference-only setting reuses the trained refiner.
        cfg = replace(cfg, detector=replace(cfg.detector, refiner={**cfg.detector.refiner, "iterations": 1}))
        det2, info2 = fit_detector(cfg, data, tr, va, tmp_path / "w")
        assert info2["refiner"]["cached"] is True and det2.refiner.config.iterations == 1
        cfg = replace(cfg, detector=replace(cfg.detector, refine=False))
        det3, info3 = fit_detector(cfg, data, tr, va, tmp_path / "w")
        assert isinstance(det3, Recorder) and "refiner" not in info3
    finally:
        DETECTORS.pop("recorder", None)


class Tunable(Recorder):
    """A detector with one inference-only setting (``conf``) and one training setting (``lr``)."""

    INFERENCE_KEYS = frozenset({"conf"})

    def __init__(self, **config: Any) -> None:
        self.config = {"conf": 0.1, "lr": 1.0, **{k: v for k, v in config.items() if k in ("conf", "lr")}}

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.config))

    @classmethod
    def load(cls, directory: Path) -> "Tunable":
        return cls(**json.loads((Path(directory) / "config.json").read_text()))


def test_inference_only_detector_settings_reuse_the_cached_model_and_apply(tmp_path: Path, data: Data) -> None:
    register("tunable")(Tunable)
    try:
        sets = [f"cache_dir={tmp_path / 'c'}", "detector.refine=false", "detector.name=tunable"]

        def options(**opts: float) -> Config:
            return load_config(None, "quick", [*sets, f"detector.options={json.dumps(opts)}"])

        fold = data.folds[0]
        tr, va = data.index(fold.train), data.index(fold.val)
        assert fit_detector(options(conf=0.1, lr=1.0), data, tr, va, tmp_path / "w")[1]["cached"] is False
        det, info = fit_detector(options(conf=0.5, lr=1.0), data, tr, va, tmp_path / "w")
        assert info["cached"] is True and det.config["conf"] == 0.5  # reused, with the new threshold
        assert fit_detector(options(conf=0.5, lr=2.0), data, tr, va, tmp_path / "w")[1]["cached"] is False  # retrained
        with pytest.raises(ValueError, match="change training"):
            det.set_inference(lr=3.0)
    finally:
        DETECTORS.pop("tunable", None)
