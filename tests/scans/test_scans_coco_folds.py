import json
from pathlib import Path

import numpy as np
import pytest

from scans.coco import AnnotationError, decode_segmentation, encode_mask, load_coco, save_coco
from scans.dataset import load_dataset, to_arrays
from scans.folds import check_folds, load_splits, make_folds, save_splits
from scans.records import Scan, box_mask, box_to_pixels
from tests.helpers import make_dataset


def test_coco_round_trip(tmp_path: Path) -> None:
    scans = make_dataset(tmp_path, n_patients=3, per_patient=2)
    again = load_coco(tmp_path / "annotations.json", tmp_path)
    assert again == scans  # dataclass equality ignores the raw segmentation
    for a, b in zip(scans, again):
        np.testing.assert_array_equal(a.anomaly_mask(), b.anomaly_mask())
    save_coco(tmp_path / "copy.json", again, tmp_path)
    assert json.loads((tmp_path / "copy.json").read_text()) == json.loads((tmp_path / "annotations.json").read_text())


def test_polygon_and_rle_segmentations_decode_alike() -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:10, 4:20] = True
    poly = [[4, 5, 20, 5, 20, 10, 4, 10]]
    np.testing.assert_array_equal(decode_segmentation(encode_mask(mask), 20, 30), mask)
    assert (decode_segmentation(poly, 20, 30) ^ mask).sum() <= 30 + 6  # polygon rasterisation takes the border


def test_normal_scan_has_empty_anomaly_mask(tmp_path: Path) -> None:
    scans = make_dataset(tmp_path, n_patients=2, per_patient=2)
    assert scans[1].label == 0 and not scans[1].anomaly_mask().any()
    assert scans[0].label == 1 and scans[0].anomaly_mask().any()


def test_bad_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text("{oops")
    with pytest.raises(AnnotationError, match="annotations.json: invalid JSON"):
        load_dataset(tmp_path)


def test_to_arrays_resizes_boxes_and_masks(tmp_path: Path) -> None:
    scans = make_dataset(tmp_path, n_patients=2, per_patient=2, size=64)
    arr = to_arrays(scans, size=32)
    assert arr.images.shape == (4, 32, 32) and arr.images.dtype == np.float32
    np.testing.assert_allclose(arr.boxes[0], np.array(scans[0].box) / 2)
    assert arr.masks[0].any() and not arr.masks[1].any()
    assert list(arr.labels) == [s.label for s in scans]


def test_box_pixels_are_corner_inclusive() -> None:
    assert box_to_pixels((2.0, 3.0, 5.0, 4.0), 10, 10) == (2, 3, 4, 3)
    assert box_mask((2.0, 3.0, 5.0, 4.0), 10, 10).sum() == 3
    assert box_to_pixels((-5, -5, 50, 50), 10, 10) == (0, 0, 9, 9)


def _synthetic(n: int = 483, n_patients: int = 60, n_dist: int = 123, seed: int = 0) -> list[Scan]:
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, n_patients, n)
    labels = np.zeros(n, int)
    labels[rng.choice(n, n_dist, replace=False)] = 1
    return [Scan(i, Path(f"{i}.png"), f"p{patients[i]}", int(labels[i]), None, 8, 8) for i in range(n)]


def test_folds_have_no_patient_leak_and_cover_everything() -> None:
    scans = _synthetic()
    folds = make_folds(scans, k=5, seed=0)
    assert check_folds(folds, scans) == []
    tests = [i for f in folds for i in f.test]
    assert sorted(tests) == list(range(len(scans)))  # each scan tested exactly once
    for f in folds:
        assert not set(f.train) & set(f.val) and not set(f.train) & set(f.test) and not set(f.val) & set(f.test)


def test_fold_sizes_near_paper_and_stratified() -> None:
    scans = _synthetic()
    folds = make_folds(scans, k=5, seed=0)
    sizes = np.array([(len(f.train), len(f.val), len(f.test)) for f in folds])
    assert np.all(np.abs(sizes.mean(axis=0) - [308, 78, 97]) < [15, 15, 3])
    label = {s.id: s.label for s in scans}
    overall = 123 / 483
    for f in folds:
        frac = np.mean([label[i] for i in f.test])
        assert abs(frac - overall) < 0.1


def test_folds_deterministic_per_seed(tmp_path: Path) -> None:
    scans = _synthetic()
    assert make_folds(scans, seed=3) == make_folds(scans, seed=3)
    assert make_folds(scans, seed=3) != make_folds(scans, seed=4)
    save_splits(tmp_path / "splits.json", make_folds(scans, seed=3))
    assert load_splits(tmp_path / "splits.json", scans) == make_folds(scans, seed=3)


def test_leaky_splits_file_is_refused(tmp_path: Path) -> None:
    scans = _synthetic(40, 10, 8)
    p0 = [s.id for s in scans if s.patient == scans[0].patient]
    others = [s.id for s in scans if s.patient != scans[0].patient]
    (tmp_path / "splits.json").write_text(json.dumps([{"train": p0[:1] + others, "val": [], "test": p0[1:]}]))
    with pytest.raises(ValueError, match="splits.json.*both train and test"):
        load_splits(tmp_path / "splits.json", scans)
