"""A detector registered in one place (here, inside the test) reaches the CLI, the run and the reports."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detectors.base import DETECTORS, Detections, Detector, register
from pipeline.__main__ import build_parser, main
from scans.records import ScanArrays
from tests.helpers import TINY_PHANTOM, set_args


class CentralBox(Detector):
    """A toy prior: the central box covering the middle half of the image, confidence 0.9."""

    def __init__(self, **config: Any) -> None:
        self.config = dict(config)

    def fit(self, train: ScanArrays, val: ScanArrays, workdir: Path) -> dict[str, Any]:
        return {"trained": False, "n": len(train)}

    def predict(self, images: np.ndarray) -> list[Detections]:
        s = images.shape[-1]
        return [Detections(np.array([[s / 4, s / 4, 3 * s / 4, 3 * s / 4]]), np.array([0.9])) for _ in images]

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "toy.json").write_text("{}")

    @classmethod
    def load(cls, directory: Path) -> CentralBox:
        assert (Path(directory) / "toy.json").is_file()
        return cls()


@pytest.fixture()
def toy() -> Iterator[str]:
    register("toy", display="Central box")(CentralBox)
    try:
        yield "toy"
    finally:
        DETECTORS.pop("toy", None)


def test_a_registered_detector_is_a_cli_choice(toy: str) -> None:
    parser = build_parser()
    assert parser.parse_args(["run", "--detector", toy]).detector == toy
    assert parser.parse_args(["train", "--detector", toy, "--out", "x"]).detector == toy
    assert toy in parser.parse_args(["ablate"]).detectors.split(",")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--detector", "gt", "--out", "x"])  # the ground truth is not trainable
    DETECTORS.pop(toy)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--detector", toy])


def test_a_registered_detector_runs_through_the_quick_profile(
    toy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))
    sets = [
        *TINY_PHANTOM,
        "unet.epochs=1",
        "riad.enabled=false",
        "evaluation.figures=false",
        "detector.refiner={steps: 2}",
        f"cache_dir={tmp_path / 'models'}",
    ]
    out = tmp_path / "run"
    args = ["run", "--detector", toy, "--profile", "quick", "--out", str(out), "--no-progress"]
    assert main(args + set_args(sets)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["detector"] == toy and set(summary["priors"]) == {toy, "gt"}
    assert summary["detection"]["map50"]["mean"] is not None  # scored as a trained detector
    assert (out / "folds" / "0" / toy / "test_predictions.coco.json").is_file()
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert {r["prior_source"] for r in rows} == {toy, "gt"}
    assert "Central box" in (out / "table1.md").read_text() + (out / "table2.md").read_text()


def test_compare_scores_prior_guided_peers_in_the_registered_detectors_boxes(
    toy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.config import load_config
    from pipeline.experiment import compare
    from scans.phantom import generate_dataset

    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))
    held_out = tmp_path / "held-out"
    generate_dataset(held_out, n_images=12, n_distended=4, n_patients=6, size=64, seed=11, progress=False)
    sets = [*TINY_PHANTOM, "unet.epochs=1", "run_folds=[0]", "riad.enabled=false", "evaluation.figures=false"]
    sets += ["detector.refine=false", f"evaluation.external={held_out}", f"cache_dir={tmp_path / 'models'}"]
    cfg = load_config(profile="quick", overrides=sets)
    cfg = replace(cfg, detector=replace(cfg.detector, name=toy), progress=False)
    seen: list[tuple[str, int, np.ndarray | None]] = []
    real = compare.predict_peer

    def spy(peer: Any, images: np.ndarray, boxes: np.ndarray | None = None, **kw: Any) -> Any:
        seen.append((peer.name, len(images), None if boxes is None else np.array(boxes)))
        return real(peer, images, boxes, **kw)

    monkeypatch.setattr(compare, "predict_peer", spy)
    summary = compare.execute_compare(cfg, tmp_path / "cmp", "loris,patchcore_box,padim")
    s = cfg.image_size
    in_box = [(n, b) for name, n, b in seen if name == "patchcore_box"]
    assert len(in_box) == 3  # validation, test, the held-out set: each in the toy's central box, none in the truth
    for n, boxes in in_box:
        assert boxes is not None and boxes.shape == (n, 4)
        np.testing.assert_allclose(boxes, np.tile([s / 4, s / 4, 3 * s / 4, 3 * s / 4], (n, 1)))
    assert [b for name, _, b in seen if name == "padim"] == [None] * 3  # the whole-image peer gets no boxes
    saved = {
        m: json.loads((tmp_path / "cmp" / "folds" / "0" / "compare" / f"{m}.json").read_text())["key"]
        for m in ("padim", "patchcore_box")
    }
    assert f"|prior={toy}|" in saved["patchcore_box"] and "|prior=" not in saved["padim"]  # only box peers rescore
    assert summary["detector"] == toy
