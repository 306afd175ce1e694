"""The synthetic knee-ultrasound phantom: determinism, annotations, splits, atomicity, statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scans.coco import load_coco
from scans.folds import check_folds, load_splits
from scans.phantom import default_dataset, generate_dataset, render_scan, sample_anatomy
from scans.readers import read_image
from scans.records import box_mask

N, D, P, S = 24, 8, 8, 128

# Tiny datasets leave some folds with few distended images; sklearn only warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("ph") / "a", N, D, P, size=S, seed=3, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(dataset: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "b", N, D, P, size=S, seed=3, progress=False)
    assert _files(again) == _files(dataset)
    other = generate_dataset(tmp_path / "c", N, D, P, size=S, seed=4, progress=False)
    assert _files(other)["images/0001.png"] != _files(dataset)["images/0001.png"]


def test_counts_labels_and_images(dataset: Path) -> None:
    scans = load_coco(dataset / "annotations.json", dataset)
    assert len(scans) == N
    assert sum(s.label for s in scans) == D
    assert len({s.patient for s in scans}) == P
    doc = json.loads((dataset / "annotations.json").read_text())
    assert all(isinstance(im["patient_id"], str) and isinstance(im["distended"], bool) for im in doc["images"])
    assert len(doc["annotations"]) == N and doc["categories"][0]["name"] == "recess"
    for s in scans:
        img = read_image(s.path)
        assert img.shape == (S, S) and s.width == s.height == S
        assert s.box is not None and 0 <= s.box[0] < s.box[2] <= S and 0 <= s.box[1] < s.box[3] <= S


def test_masks_inside_boxes(dataset: Path) -> None:
    for s in load_coco(dataset / "annotations.json", dataset):
        mask = s.anomaly_mask()
        assert mask.any() == s.distended
        assert not (mask & ~box_mask(s.box, S, S)).any()


def test_splits_have_no_patient_leak(dataset: Path) -> None:
    scans = load_coco(dataset / "annotations.json", dataset)
    folds = load_splits(dataset / "splits.json", scans)
    assert len(folds) == 5 and check_folds(folds, scans) == []


def test_refuses_non_empty_out_and_leaves_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_dataset(out, 16, 4, 6, size=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_dataset(empty, 16, 4, 6, size=64, progress=False) / "annotations.json").is_file()


def test_default_dataset_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))
    first = default_dataset(n_images=16, n_distended=4, n_patients=6, size=64, progress=False)
    assert first.parent == tmp_path / "cache" / "phantom"
    stamp = (first / "annotations.json").stat().st_mtime_ns
    assert default_dataset(n_images=16, n_distended=4, n_patients=6, size=64, progress=False) == first
    assert (first / "annotations.json").stat().st_mtime_ns == stamp


def test_pockets_darker_and_boxes_taller() -> None:
    heights: dict[bool, list[float]] = {True: [], False: []}
    contrast = []
    for i in range(30):
        rng = np.random.default_rng(i)
        anatomy = sample_anatomy(rng)
        distended = i % 2 == 0
        r = render_scan(rng, anatomy, 0.3 + 0.5 * rng.random() if distended else 0.0, S)
        heights[distended].append(r.box[3] - r.box[1])
        assert not (r.recess & ~box_mask(r.box, S, S)).any()
        if distended:
            ring = box_mask(r.box, S, S) & ~r.pocket
            contrast.append(r.image[ring].mean() - r.image[r.pocket].mean())
    assert np.mean(contrast) > 0.15 and min(contrast) > 0.0
    assert np.mean(heights[True]) > np.mean(heights[False]) + 3  # v3: ~4.5 px at 128 (the pocket, less the pad it compresses)
    assert min(heights[False]) >= 0.05 * S  # walls included: no sliver boxes
