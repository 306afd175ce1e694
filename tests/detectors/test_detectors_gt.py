"""The ground-truth detector honours the Detector contract and returns the annotated boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors import DETECTORS, PriorPolicy, build_detector
from detectors.base import Detections, Detector
from detectors.gt import GtDetector
from scans.records import ScanArrays


def _arrays(n: int = 3, size: int = 32) -> ScanArrays:
    boxes = np.array([[2, 3, 20, 9], [5, 5, 30, 12], [np.nan] * 4][:n], dtype=np.float32)
    return ScanArrays(
        np.zeros((n, size, size), np.float32),
        boxes,
        np.zeros((n, size, size), bool),
        np.array([0, 1, -1][:n]),
        np.arange(n),
        [f"p{i}" for i in range(n)],
        np.ones((n, 2), np.float32),
    )


def test_registered_and_built_by_name() -> None:
    assert DETECTORS["gt"] is GtDetector
    det = build_detector("gt", any_key="ignored")
    assert isinstance(det, Detector) and det.name == "gt"


def test_returns_annotated_boxes_with_score_one(tmp_path: Path) -> None:
    a = _arrays()
    det = build_detector("gt")
    assert det.fit(a, a, tmp_path)["trained"] is False
    for dets in (
        det.with_boxes(a.boxes).predict(a.images),
        det.predict(a.images, boxes=a.boxes),
        GtDetector.for_arrays(a).predict(a.images),
    ):
        assert all(isinstance(d, Detections) for d in dets)
        np.testing.assert_array_equal(dets[0].boxes, a.boxes[:1])
        np.testing.assert_array_equal(dets[1].scores, [1.0])
        assert len(dets[2]) == 0  # no annotation -> no detection


def test_missing_box_falls_back_to_median() -> None:
    a = _arrays()
    policy = PriorPolicy(threshold=0.5, median_box=PriorPolicy.median_of(a.boxes, 32, 32))
    priors = policy.select_all(GtDetector.for_arrays(a).predict(a.images), 32, 32)
    assert [p.source for p in priors] == ["detector", "detector", "fallback"]
    assert priors[0].box == (2.0, 3.0, 20.0, 9.0) and priors[0].score == 1.0


def test_needs_boxes_of_the_right_length() -> None:
    a = _arrays()
    with pytest.raises(ValueError, match="needs boxes"):
        GtDetector().predict(a.images)
    with pytest.raises(ValueError, match="3 images but 2"):
        GtDetector().predict(a.images, boxes=a.boxes[:2])
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        GtDetector(boxes=np.zeros(4))


def test_save_load_round_trip(tmp_path: Path) -> None:
    GtDetector().save(tmp_path)
    assert isinstance(GtDetector.load(tmp_path), GtDetector)
    (tmp_path / "detector.json").write_text('{"detector": "yolov5"}')
    with pytest.raises(ValueError):
        GtDetector.load(tmp_path)
