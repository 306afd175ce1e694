"""The synthetic knee-ultrasound phantom: determinism, annotations, splits, atomicity, statistics,
class-free boxes, annotator noise, the patient spread of distension, the ``null`` control, the
pockets' appearances and the pocket-free twins."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from scans import phantom
from scans.__main__ import main as scans_main
from scans.coco import load_coco
from scans.folds import check_folds, load_splits
from scans.phantom import (
    dataset_geometry,
    dataset_key,
    default_dataset,
    distended_cap,
    generate_dataset,
    render_scan,
    sample_anatomy,
    scan_geometry,
    twins_of,
)
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


def test_pockets_darker_and_boxes_class_free() -> None:
    contrast = []
    for i in range(16):
        anatomy = sample_anatomy(np.random.default_rng([7, i]))
        severity = 0.3 + 0.5 * np.random.default_rng([8, i]).random()
        r = render_scan(np.random.default_rng(i), anatomy, severity, S)
        normal = render_scan(np.random.default_rng(i), anatomy, 0.0, S)
        # The same stream gives the same box whatever the severity: the box carries no class.
        assert r.box == normal.box
        assert not (normal.recess & ~box_mask(normal.box, S, S)).any()
        assert normal.box[3] - normal.box[1] >= 0.15 * S  # from the femur cortex up into the tendon
        ring = box_mask(r.box, S, S) & ~r.pocket
        contrast.append(r.image[ring].mean() - r.image[r.pocket].mean())
    assert np.mean(contrast) > 0.15 and min(contrast) > 0.0


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_size_alone_does_not_separate_the_classes(seed: int) -> None:
    # The default phantom's geometry (no rendering; the renderer calls the same scan_geometry).
    # The box rule ignores the pocket, so box size alone stays near chance (figures: docs/results.md).
    patient, distended, geoms = dataset_geometry(483, 123, 60, 256, seed)
    boxes = np.array([g.box for g in geoms])
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    for name, score in (("height", h), ("width", w), ("area", h * w)):
        assert 0.40 <= _auroc(distended, score) <= 0.60, name
    # The box holds the pockets: few distended scans' pockets reach its top row.
    touching = [g.pocket[int(g.box[1])].any() for g, d in zip(geoms, distended) if d]
    assert np.mean(touching) < 0.1


def test_annotator_noise_is_present_and_small() -> None:
    _, distended, geoms = dataset_geometry(60, 15, 10, 256, seed=100)
    res = np.array([np.subtract(g.box, g.anatomical_box) for g in geoms])
    inside = np.array([[0 < g.anatomical_box[k] < 256 for k in range(4)] for g in geoms])  # edges not clipped
    r = res[inside]
    assert (np.abs(r) > 0.05).mean() > 0.8  # boxes are not an exact function of the anatomy
    assert 0.8 < r.std() < 2.5 and np.abs(r).max() < 8  # sd ~1.5 px at 256
    # The exact box sits just below the femur cortex over its columns, whatever the class.
    for g in geoms:
        c0, c1 = int(g.anatomical_box[0]), int(np.ceil(g.anatomical_box[2]))
        below = g.anatomical_box[3] / 256 - g.femur[c0:c1].max()
        assert abs(below - phantom.BOX_BELOW_CORTEX) < 1e-6 or g.anatomical_box[3] == 256


def test_distension_spreads_over_patients() -> None:
    for seed in (0, 1, 2):
        patient, distended = phantom._assign(np.random.default_rng([seed, 2]), 483, 123, 60)
        per = np.bincount(patient[distended], minlength=60)
        assert distended.sum() == 123 and (per > 0).sum() >= 25 and per.max() <= 6  # 5% of 123
        assert (per == 0).sum() >= 5  # still heterogeneous: some patients never distend
    for n, d, p in ((100, 30, 25), (N, D, P), (12, 3, 6), (10, 10, 3)):
        patient, distended = phantom._assign(np.random.default_rng(1), n, d, p)
        counts, per = np.bincount(patient, minlength=p), np.bincount(patient[distended], minlength=p)
        assert distended.sum() == d and (counts >= 1).all() and (per <= counts).all()
        assert per.max() <= distended_cap(d, counts)
    assert distended_cap(123, np.full(60, 8)) == 6


def test_null_control_renders_no_pocket() -> None:
    gaps_real, gaps_null = [], []
    for i in range(6):
        anatomy = sample_anatomy(np.random.default_rng([9, i]))
        real = render_scan(np.random.default_rng(i), anatomy, 0.6, S)
        null = render_scan(np.random.default_rng(i), anatomy, 0.6, S, null=True)
        normal = render_scan(np.random.default_rng(i), anatomy, 0.0, S)
        # The null scan is exactly the normal scan its stream draws, with the real scan's box and mask.
        assert np.array_equal(null.image, normal.image) and null.box == real.box
        assert np.array_equal(null.pocket, real.pocket) and null.pocket.any()
        ring = box_mask(real.box, S, S) & ~real.pocket
        gaps_real.append(real.image[ring].mean() - real.image[real.pocket].mean())
        gaps_null.append(null.image[ring].mean() - null.image[null.pocket].mean())
    assert np.mean(gaps_real) > np.mean(gaps_null) + 0.1
    assert scan_geometry(np.random.default_rng(0), anatomy, 0.6, S, null=True).rendered_pocket is False


def test_null_dataset_and_cli(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "null"
    assert (
        scans_main(
            [
                "phantom",
                "--null",
                "--out",
                str(out),
                "--images",
                str(N),
                "--distended",
                str(D),
                "--patients",
                str(P),
                "--size",
                str(S),
                "--seed",
                "3",
            ]
        )
        == 0
    )
    real, null = load_coco(dataset / "annotations.json", dataset), load_coco(out / "annotations.json", out)
    inside_real, inside_null = [], []
    for a, b in zip(real, null):
        assert (a.label, a.patient, a.box) == (b.label, b.patient, b.box)
        assert np.array_equal(a.anomaly_mask(), b.anomaly_mask())
        ia, ib = read_image(a.path), read_image(b.path)
        if a.distended:
            assert not np.array_equal(ia, ib)
            inside_real.append(ia[a.anomaly_mask()].mean())
            inside_null.append(ib[a.anomaly_mask()].mean())
        else:
            assert np.array_equal(ia, ib)  # normal scans are identical in the control
    assert np.mean(inside_null) > np.mean(inside_real) + 0.1
    assert dataset_key(seed=3, null=True).endswith("-seed3-null") and dataset_key().startswith("v4-")


# ----------------------------------------------------------------------------------------
# Appearances and twins

# Digest (pixels of every image, annotations.json, splits.json) of generate_dataset(12, 4, 6,
# size=64, seed=11), computed with the generator as it was before appearances existed: the
# default (anechoic) phantom must never change (dataset fingerprints and cached models hang on it).
PHANTOM_V4_DIGEST = "43e965a9797bfeb642654fb76d4ee694fad52d339ff1adfa40444fbd50c2dc4a"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            # decoded pixels, not PNG bytes: the encoder's version may change the bytes, not the image
            h.update(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).tobytes() if p.suffix == ".png" else p.read_bytes())
    return h.hexdigest()


def test_default_appearance_is_phantom_v4(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "pin", 12, 4, 6, size=64, seed=11, progress=False, appearance="anechoic")
    assert _digest(root) == PHANTOM_V4_DIGEST
    assert dataset_key(appearance="anechoic") == dataset_key() == "v4-n483-d123-p60-s256-seed0"
    assert dataset_key(appearance="echogenic", null=True) == "v4-n483-d123-p60-s256-seed0-echogenic-null"
    with pytest.raises(ValueError, match="appearance"):
        dataset_key(appearance="grey")


def _recess_distance(g: phantom.ScanGeometry) -> np.ndarray:
    """Distance (output pixels) of every pixel from the rendered recess of geometry ``g``."""
    rows = (np.arange(S) + 0.5)[:, None] / S
    recess = (rows >= g.roof[None, :] - 0.5 / S) & (rows <= g.floor[None, :] + 0.5 / S) & (g.taper > 0)[None, :]
    return cv2.distanceTransform((~recess).astype(np.uint8), cv2.DIST_L2, 5)


def test_appearances_change_only_the_pockets(dataset: Path, tmp_path: Path) -> None:
    other = {
        a: generate_dataset(tmp_path / a, N, D, P, size=S, seed=3, progress=False, appearance=a)
        for a in ("echogenic", "mixed")
    }
    _, _, geoms = dataset_geometry(N, D, P, S, seed=3)
    means: dict[str, list[float]] = {"anechoic": [], "echogenic": [], "mixed": []}
    for root in other.values():
        for name in ("annotations.json", "splits.json"):
            assert (root / name).read_bytes() == (dataset / name).read_bytes()
    for s, g in zip(load_coco(dataset / "annotations.json", dataset), geoms):
        base = read_image(s.path)
        if not s.distended:  # normal scans: byte-identical whatever the appearance
            assert all((root / "images" / s.path.name).read_bytes() == s.path.read_bytes() for root in other.values())
            continue
        pocket = s.anomaly_mask()
        means["anechoic"].append(base[pocket].mean())
        for a, root in other.items():
            img = read_image(root / "images" / s.path.name)
            changed = img != base
            # only inside the recess, plus the point-spread function's blur around it
            assert changed.any() and _recess_distance(g)[changed].max() <= 6
            means[a].append(img[pocket].mean())
    ane, echo, mixed = (np.array(means[a]) for a in ("anechoic", "echogenic", "mixed"))
    assert (echo > ane + 0.05).all() and echo.mean() > ane.mean() + 0.12
    assert (mixed > ane).all() and mixed.mean() < echo.mean()  # clots and synovium in darker fluid


def test_appearance_draws_leave_the_stream_alone() -> None:
    anatomy = sample_anatomy(np.random.default_rng([9, 0]))
    states, images = [], {}
    for a in phantom.APPEARANCES:
        rng = np.random.default_rng(1)
        images[a] = render_scan(rng, anatomy, 0.6, 64, appearance=a).image
        states.append(rng.bit_generator.state["state"])
        for severity, null in ((0.0, False), (0.6, True)):  # nothing to fill: the same image
            ref = render_scan(np.random.default_rng(1), anatomy, severity, 64, null)
            assert np.array_equal(
                render_scan(np.random.default_rng(1), anatomy, severity, 64, null, appearance=a).image, ref.image
            )
    assert states[0] == states[1] == states[2]
    assert not np.array_equal(images["anechoic"], images["echogenic"])
    assert not np.array_equal(images["echogenic"], images["mixed"])
    with pytest.raises(ValueError, match="appearance"):
        render_scan(np.random.default_rng(1), anatomy, 0.6, 64, appearance="grey")


def _smooth_corr(a: np.ndarray, b: np.ndarray) -> float:
    blur = lambda x: cv2.GaussianBlur(x, (0, 0), 2.0).ravel()  # noqa: E731
    return float(np.corrcoef(blur(a), blur(b))[0, 1])


def test_twins_are_the_scans_without_pocket_with_fresh_speckle(dataset: Path, tmp_path: Path) -> None:
    twins = twins_of(dataset, seed=3)
    scans = load_coco(dataset / "annotations.json", dataset)
    assert list(twins) == [s.path.relative_to(dataset).as_posix() for s in scans]
    null = generate_dataset(tmp_path / "null", N, D, P, size=S, seed=3, progress=False, null=True)
    gaps = []
    for s in scans:
        img, twin = read_image(s.path), twins[s.path.relative_to(dataset).as_posix()]
        assert twin.shape == img.shape and twin.dtype == np.float32
        assert not np.array_equal(twin, img)  # fresh speckle
        if not s.distended:  # the same scan but for its speckle
            assert _smooth_corr(img, twin) > 0.97
            continue
        # The pocket-free scan (the null control's, same stream) but for its speckle: no dark pocket.
        pocket, without = s.anomaly_mask(), read_image(null / "images" / s.path.name)
        assert _smooth_corr(without, twin) > 0.97
        assert abs(twin[pocket].mean() - without[pocket].mean()) < 0.05
        gaps.append(twin[pocket].mean() - img[pocket].mean())
    assert min(gaps) > 0.05 and np.mean(gaps) > 0.12
    # Twins hang on the seed and the composition only: any appearance's dataset has the same.
    of_null = twins_of(null, seed=3)
    assert all(np.array_equal(of_null[k], v) for k, v in twins.items())
    assert not np.array_equal(
        phantom.dataset_twins(N, D, P, S, seed=3, draw=1)["images/0001.png"], twins["images/0001.png"]
    )
    with pytest.raises(ValueError, match="not the phantom of seed 4"):
        twins_of(dataset, seed=4)


def test_twins_cli_and_generate(dataset: Path, tmp_path: Path) -> None:
    comp = ["--images", str(N), "--distended", str(D), "--patients", str(P), "--size", str(S), "--seed", "3"]
    out = tmp_path / "ph"
    assert scans_main(["phantom", "--out", str(out), "--appearance", "mixed", "--twins", *comp]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json", "images", "splits.json", "twins"]
    copy = Path(shutil.copytree(dataset, tmp_path / "copy"))
    # An existing phantom folder: --twins writes its twins only.
    assert scans_main(["phantom", "--out", str(copy), "--twins", "--seed", "3"]) == 0
    twins = twins_of(dataset, seed=3)
    for name, twin in twins.items():
        png = Path(name).name
        assert (out / "twins" / png).read_bytes() == (copy / "twins" / png).read_bytes()
        assert np.array_equal(read_image(out / "twins" / png), twin)
    with pytest.raises(FileExistsError, match="twins"):
        phantom.write_twins(copy, seed=3)
