"""Box fusion: weighted averaging of the top cluster, and the vectorised IoU."""

import numpy as np
import pytest

from detectors.fusion import fuse_top, iou_one_to_many


def test_fuse_top_weights_by_score_and_ignores_other_clusters() -> None:
    boxes = np.array([[10, 10, 50, 30], [14, 10, 54, 30], [100, 100, 120, 110], [10, 12, 50, 32]], np.float32)
    scores = np.array([0.9, 0.3, 0.95, 0.6], np.float32)
    # The best candidate is the far box (0.95): it is alone in its cluster and is returned as is.
    np.testing.assert_allclose(fuse_top(boxes, scores), boxes[2])
    scores[2] = 0.1
    fused = fuse_top(boxes, scores)
    w = np.array([0.9, 0.3, 0.6])
    np.testing.assert_allclose(fused, (boxes[[0, 1, 3]] * w[:, None]).sum(0) / w.sum(), rtol=1e-6)


def test_fuse_top_iou_threshold_selects_members() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 14]], np.float32)  # IoU 10/14 = 0.714
    scores = np.array([1.0, 1.0], np.float32)
    assert fuse_top(boxes, scores, iou=0.8).tolist() == [0, 0, 10, 10]
    assert fuse_top(boxes, scores, iou=0.7).tolist() == [0, 0, 10, 12]
    with pytest.raises(ValueError):
        fuse_top(np.zeros((0, 4)), np.zeros(0))


def test_iou_one_to_many() -> None:
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(iou_one_to_many(b[0], b), [1.0, 50 / 150, 0.0])
