"""The diagnosis tool's parts on small synthetic inputs (issue 25): the shares of a map's score from inside
the box, below it and the rest, with its correlation with box area; the pooling table; the feature-space map;
every map of a scan against a reconstruction; and the ideal-inpainter ceiling on a tiny phantom's twins."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch

from evaluation.metrics import image_auroc
from pipeline.config import load_config
from pipeline.experiment import diagnose
from pipeline.experiment.diagnose import FEATURE_LAYERS, POOLINGS, FeatureDeviation, all_maps, ceiling, decomposition
from pipeline.shared.data import load_data
from reconstruction.deviation import GMS_C_GMSD, anomaly_map, gmsd_map, image_score
from reconstruction.peers.backbones import lite0_state_dict
from scans.phantom import twins_of
from scans.readers import resize_image

pytestmark = pytest.mark.usefixtures("one_thread")

MAPS = {"msgmsd", "gmsd", "ssim", "dd", "l2", "msgmsd_c36", "gmsd_c36", "feature"}
BOX = np.array([8.0, 10.0, 24.0, 20.0])  # on 32 px: columns 8..23, rows 10..19 (160 pixels); rows 20..31 below


@pytest.fixture(scope="module")
def feature() -> Iterator[FeatureDeviation]:
    """One feature extractor for the module (building it loads the ImageNet weights, a few seconds)."""
    yield FeatureDeviation()


def _texture(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` smooth random images ``[n, size, size]`` in [0, 1] (blurred noise, so features see structure)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random((n, 1, size, size), dtype=np.float32))
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    return x[:, 0].numpy()


# --- decomposition ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:An input array is constant")  # one box size: rho is undefined here
def test_decomposition_shares_of_a_map_inside_below_and_outside_the_box() -> None:
    """A map that is 1 in the box and 0 elsewhere is all box; a uniform map splits by pixel counts (160 box,
    384 below, 480 rest of 1024); shares are the mean of per-image shares, not a ratio of sums."""
    boxes = np.tile(BOX, (3, 1))
    inside = np.zeros((32, 32))
    inside[10:20, 8:24] = 1.0
    below = np.zeros((32, 32))
    below[25:, :] = 1.0  # below the box's bottom edge, across the whole width
    uniform = np.ones((32, 32))
    labels = np.zeros(3, int)
    s = decomposition(np.stack([inside] * 3), boxes, labels)
    assert (s["box"], s["below"], s["rest"]) == pytest.approx((1.0, 0.0, 0.0))
    s = decomposition(np.stack([below] * 3), boxes, labels)
    assert (s["box"], s["below"], s["rest"]) == pytest.approx((0.0, 1.0, 0.0))
    s = decomposition(np.stack([uniform] * 3), boxes, labels)
    assert (s["box"], s["below"], s["rest"]) == pytest.approx((160 / 1024, 384 / 1024, 480 / 1024))
    s = decomposition(np.stack([inside, uniform, uniform]), boxes, labels)
    assert s["box"] == pytest.approx((1 + 2 * 160 / 1024) / 3)  # a ratio of sums would give 480 / 2208
    assert s["box"] + s["below"] + s["rest"] == pytest.approx(1.0)


def test_decomposition_correlates_the_image_and_box_scores_with_box_area_on_normal_scans_only() -> None:
    """Boxes of growing width with a map of ``1/sqrt(area)`` inside the box and 0 outside: the image mean
    (``sqrt(area)/1024``) rises with area (rho +1), the box mean falls (rho -1). Distended scans that would
    break both (``1000/area**2``: both means fall with area) are left out."""
    widths = np.arange(4, 12)
    boxes = np.array([[8.0, 10.0, 8.0 + w, 20.0] for w in widths] * 2)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    labels = np.r_[np.zeros(8), np.ones(8)].astype(int)
    value = np.r_[1 / np.sqrt(area[:8]), 1000 / area[8:] ** 2]
    maps = np.zeros((16, 32, 32))
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        maps[i, y0:y1, x0:x1] = value[i]
    s = decomposition(maps, boxes, labels)
    assert s["rho_area_image"] == pytest.approx(1.0)
    assert s["rho_area_box"] == pytest.approx(-1.0)
    assert s["box"] == pytest.approx(1.0)
    flipped = decomposition(maps, boxes, 1 - labels)  # the distended half alone: the image mean falls too
    assert flipped["rho_area_image"] == pytest.approx(-1.0) and flipped["rho_area_box"] == pytest.approx(-1.0)


# --- the pooling table --------------------------------------------------------------------------------


def _ring() -> tuple[np.ndarray, np.ndarray]:
    """A 48 px box ``(12, 12, 60, 60)`` in a 72 px map (room for ``+8px`` and ``-16px``) and each pixel's
    Chebyshev distance inside it (0 on its edge, negative outside)."""
    rows, cols = np.mgrid[:72, :72]
    return np.array([[12.0, 12.0, 60.0, 60.0]]), np.minimum.reduce([rows - 12, 59 - rows, cols - 12, 59 - cols])


def _by_name(name: str, m: np.ndarray, depth: np.ndarray) -> float:
    """What the row named ``name`` (``region[±Npx]/mean|topX%``) must score ``m``, computed with plain numpy;
    ``depth`` is each pixel's Chebyshev distance inside the box (negative outside)."""
    found = re.fullmatch(r"(image|box)(?:([+-]\d+)px)?/(mean|top(\d+)%)", name)
    assert found, name
    region, margin, pooling, pct = found.groups()
    sel = np.ones_like(m, bool) if region == "image" else depth >= -int(margin or 0)
    values = np.sort(m[sel])[::-1]
    k = values.size if pooling == "mean" else math.ceil(values.size * int(pct) / 100)
    return float(values[:k].mean())


def test_every_pooling_scores_the_region_its_name_says() -> None:
    """Each POOLINGS row on a random map (:func:`_ring`'s box): the mean or top fraction over the
    whole image or the box grown (``+8px``) or shrunk (``-Npx``) by its margin, as its name says."""
    assert set(POOLINGS) == {
        "image/mean",
        "image/top1%",
        "box/mean",
        "box/top10%",
        "box/top25%",
        "box+8px/mean",
        *(f"box-{k}px/mean" for k in (2, 4, 6, 8, 10, 12, 16)),
        "box-4px/top25%",
    }
    m = np.random.default_rng(3).random((72, 72))
    box, depth = _ring()
    scores = {}
    for name, kw in POOLINGS.items():
        scores[name] = float(image_score(m[None], box, **kw)[0])
        assert scores[name] == pytest.approx(_by_name(name, m, depth), abs=1e-12), name
    assert len(set(scores.values())) == len(scores)  # every row pools a region of its own


def test_shrunk_box_poolings_leave_out_the_seam() -> None:
    """A map bright only on the box's outer 4-pixel ring: the ``-4px`` and deeper rows score 0, ``-2px`` does
    not; the box and ``+8px`` rows see the ring; a bright ring outside the box reaches only ``+8px`` and image."""
    box, depth = _ring()
    seam = ((depth >= 0) & (depth < 4)).astype(float)[None]
    outside = ((depth < 0) & (depth >= -8)).astype(float)[None]
    for name, kw in POOLINGS.items():
        on_seam, off_box = float(image_score(seam, box, **kw)[0]), float(image_score(outside, box, **kw)[0])
        margin = kw.get("margin", 0)
        if kw["region"] == "box" and margin <= -4:
            assert on_seam == 0.0, name
        else:
            assert on_seam > 0.0, name
        assert (off_box > 0.0) == (kw["region"] == "image" or margin > 0), name


# --- the feature-space map ----------------------------------------------------------------------------


def test_feature_deviation_uses_the_packaged_imagenet_weights_at_strides_4_and_8(feature: FeatureDeviation) -> None:
    """The extractor holds EfficientNet-Lite0's ImageNet weights (from the installed package, not random
    init) and returns the two texture stages of :data:`FEATURE_LAYERS`, at strides 4 and 8."""
    state = lite0_state_dict()
    assert state is not None
    own = feature.net.state_dict()
    assert torch.equal(own["conv_stem.weight"], state["conv_stem.weight"])
    assert FEATURE_LAYERS == (1, 2)
    with torch.inference_mode():
        assert [f.shape[-1] for f in feature.net(torch.zeros(1, 3, 64, 64))] == [64 // 4, 64 // 8]
    assert not feature.net.training


def test_feature_deviation_is_zero_against_itself_and_local_to_a_changed_patch(feature: FeatureDeviation) -> None:
    """``1 - cos`` of features: 0 for a scan against itself, image-sized ``[N, 1, H, W]``, in [0, 2], and
    larger where the reconstruction differs (a replaced quadrant) than in the untouched opposite corner."""
    x = torch.from_numpy(_texture(2, 64, 0))[:, None] * 2 - 1
    same = feature(x, x)
    assert same.shape == (2, 1, 64, 64)
    assert float(same.abs().max()) < 1e-5
    r = x.clone()
    r[..., 32:, 32:] = torch.from_numpy(_texture(2, 32, 1))[:, None] * 2 - 1
    d = feature(x, r)
    assert float(d.min()) >= -1e-6 and float(d.max()) <= 2.0
    changed, untouched = d[..., 40:, 40:].mean((1, 2, 3)), d[..., :16, :16].mean((1, 2, 3))
    assert bool((changed > 0.1).all()) and bool((changed > 5 * untouched).all())


# --- every map ----------------------------------------------------------------------------------------


class _Difference(FeatureDeviation):
    """A stand-in feature map: ``|a - b|`` of what ``all_maps`` passes it (no network)."""

    def __init__(self) -> None:
        pass

    def __call__(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (x - r).abs()


def test_all_maps_are_zero_for_a_scan_against_itself(feature: FeatureDeviation) -> None:
    """Every map, plain and variant, is ``[N, H, W]`` and (near) zero where the reconstruction is the scan."""
    images = _texture(3, 32, 2)
    maps = all_maps(images, images.copy(), feature)
    assert set(maps) == MAPS
    for name, m in maps.items():
        assert m.shape == (3, 32, 32), name
        assert float(np.abs(m).max()) < 1e-4, name


def test_all_maps_match_their_registered_maps_on_inputs_scaled_to_minus_one_one() -> None:
    """Each map is its registered map (``msgmsd_c36`` is ``msgmsd_c170``, ``gmsd_c36`` GMSD with GMSD's
    constant) of the images scaled from [0, 1] to [-1, 1], in order across the batches of 16 (18 images);
    the feature map gets the same scaled pair."""
    images, recon = _texture(18, 32, 4), _texture(18, 32, 5)
    maps = all_maps(images, recon, _Difference())
    x, r = torch.from_numpy(images)[:, None] * 2 - 1, torch.from_numpy(recon)[:, None] * 2 - 1
    want = {n: anomaly_map(n, x, r) for n in ("msgmsd", "gmsd", "ssim", "dd", "l2")}
    want["msgmsd_c36"] = anomaly_map("msgmsd_c170", x, r)
    want["gmsd_c36"] = gmsd_map(x, r, c=GMS_C_GMSD)
    want["feature"] = (x - r).abs()
    assert set(maps) == set(want)
    for name, w in want.items():
        np.testing.assert_allclose(maps[name], w[:, 0].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(maps["feature"], 2 * np.abs(images - recon), rtol=1e-5, atol=1e-6)
    assert not np.allclose(maps["msgmsd_c36"], maps["msgmsd"]) and not np.allclose(maps["gmsd_c36"], maps["gmsd"])
    last = all_maps(images[-1:], recon[-1:], _Difference())  # image 17 lies in the second batch
    for name in maps:
        np.testing.assert_allclose(maps[name][-1], last[name][0], rtol=1e-5, atol=1e-6, err_msg=name)


# --- the ideal-inpainter ceiling ----------------------------------------------------------------------


# 16 scans (6 distended) of 6 patients, rendered at 128 px and scored at 64 px
CEILING = [
    "seed=0",
    "phantom.images=16",
    "phantom.distended=6",
    "phantom.patients=6",
    "phantom.size=128",
    "image_size=64",
    "folds=2",
]


@pytest.mark.usefixtures("module_cache_env")
def test_ceiling_scores_every_scan_against_its_pocket_free_twin(
    feature: FeatureDeviation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ceiling scores all 16 scans (no folds) against their twins: every map x pooling row and the shares
    of every map; its L2 scores are those of the scans against :func:`scans.phantom.twins_of`, and the ideal
    inpainter separates the pocket scans (box-mean I-AUROC >= 0.95; a scan against itself would give 0.5)."""
    monkeypatch.setattr(diagnose, "FeatureDeviation", lambda: feature)  # the module's extractor, built once
    cfg = replace(load_config(profile="quick", overrides=CEILING), progress=False)
    result, scores = ceiling(cfg)
    assert (result["seed"], result["folds"], result["n"]) == (0, [], 16)
    assert int(scores["labels"].sum()) == 6 and len(scores["patients"]) == 16
    assert set(result["rows"]) == {f"{m} {p}" for m in MAPS for p in POOLINGS} | {"control: box area"}
    assert set(result["shares"]) == MAPS
    data = load_data(cfg)
    twins = twins_of(data.root, cfg.seed)
    recon = np.stack([resize_image(twins[s.path.relative_to(data.root).as_posix()], 64) for s in data.scans])
    x, r = torch.from_numpy(data.arrays.images)[:, None] * 2 - 1, torch.from_numpy(recon)[:, None] * 2 - 1
    l2 = anomaly_map("l2", x, r)[:, 0].numpy()
    np.testing.assert_allclose(scores["l2 box/mean"], image_score(l2, data.arrays.boxes, region="box"), rtol=1e-5)
    assert float(np.abs(recon - data.arrays.images).mean()) > 0.01  # fresh speckle: not the scans themselves
    for name in ("l2", "dd"):
        row = result["rows"][f"{name} box/mean"]
        assert row["estimate"] >= 0.95, name
        assert row["estimate"] == pytest.approx(image_auroc(scores[f"{name} box/mean"], scores["labels"]))
    assert result["rows"]["l2 box/mean"]["estimate"] > result["rows"]["control: box area"]["estimate"]
