"""U-Net, masks, losses, anomaly maps, scores and segmentation of the reconstruction package."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from reconstruction.deviation import MAP_NAMES, anomaly_map, image_score
from reconstruction.losses import msgms_loss, reconstruction_loss, ssim_map
from reconstruction.masking import apply_riad_masks, apply_single_mask, box_masks, compose_riad, riad_masks
from reconstruction.segment import segment
from reconstruction.unet import UNet, UNetConfig, count_parameters
from scans.morphology import close_open
from scans.records import box_mask, box_to_pixels


def _images(b: int = 2, s: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, s, s, generator=g) * 2 - 1


# --- U-Net -----------------------------------------------------------------------------------


def test_paper_profile_matches_paper_size() -> None:
    net = UNet(UNetConfig.profile("paper"))
    assert UNetConfig.profile("paper").widths() == (64, 128, 256, 512, 512)
    assert abs(count_parameters(net) / 1e6 - 28.8) < 0.2
    assert UNetConfig.profile("wide").widths() == (32, 64, 128, 256, 256)  # the budget curve's second width


@pytest.mark.parametrize("name", ["tiny", "cpu", "wide"])
def test_unet_shape_and_range(name: str) -> None:
    net = UNet(UNetConfig.profile(name)).eval()
    with torch.no_grad():
        y = net(_images(2, 64) * 50)  # large inputs still land in [-1, 1] through the tanh head
    assert y.shape == (2, 1, 64, 64) and float(y.abs().max()) <= 1.0


def test_unet_rejects_indivisible_size() -> None:
    with pytest.raises(ValueError):
        UNet(UNetConfig.profile("cpu"))(torch.zeros(1, 1, 60, 60))


# --- masks -----------------------------------------------------------------------------------


def test_single_mask_touches_exactly_the_box_pixels() -> None:
    rng = np.random.default_rng(0)
    h, w = 48, 40
    xy1 = rng.uniform(-5, 45, (50, 2))
    boxes = np.concatenate([xy1, xy1 + rng.uniform(0.1, 30, (50, 2))], 1).astype(np.float32)
    x = _images(50, 48)[..., :w].contiguous()
    masked, m = apply_single_mask(x, boxes)
    for i, b in enumerate(boxes):  # reference per box, vectorised code under test
        ref = torch.from_numpy(box_mask(b, h, w))
        assert torch.equal(m[i, 0], ref)
        assert bool((masked[i, 0][ref] == -1).all()) and torch.equal(masked[i, 0][~ref], x[i, 0][~ref])


def test_single_mask_margin_and_missing_box() -> None:
    b = np.array([[10.0, 10.0, 20.0, 15.0], [np.nan] * 4], np.float32)
    m = box_masks(b, 32, 32, margin=2)
    c0, r0, c1, r1 = box_to_pixels((8.0, 8.0, 22.0, 17.0), 32, 32)
    assert int(m[0].sum()) == (c1 - c0 + 1) * (r1 - r0 + 1)
    assert int(m[1].sum()) == 0


@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("size", [64, 100])
def test_riad_masks_partition_the_image(k: int, size: int) -> None:
    m = riad_masks(size, size, k, n_masks=3, generator=torch.Generator().manual_seed(k))
    assert m.shape == (3, 1, size, size)
    assert bool((m.sum(0) == 1).all())  # disjoint and covering
    if size % k == 0:  # nearly equal parts: cell counts differ by at most one
        per_mask = m.flatten(1).sum(1) // (k * k)
        assert int(per_mask.max() - per_mask.min()) <= 1
    # cells are whole: a k x k block is in one mask
    blocks = m[:, 0, : size // k * k, : size // k * k].unfold(1, k, k).unfold(2, k, k)
    assert bool((blocks.all(-1).all(-1) | ~blocks.any(-1).any(-1)).all())


def test_riad_compose_takes_each_pixel_from_the_pass_that_masked_it() -> None:
    x = _images(2, 32)
    m = riad_masks(32, 32, 4, 3, torch.Generator().manual_seed(0))
    inputs = apply_riad_masks(x, m)
    assert inputs.shape == (6, 1, 32, 32)
    for j in range(3):
        assert bool((inputs[j][m[j]] == -1).all()) and torch.equal(inputs[j][~m[j]], x[0][~m[j]])
    # a network that outputs its pass index composes to the index of the mask covering each pixel
    ids = torch.arange(3.0).repeat(2).view(6, 1, 1, 1).expand(6, 1, 32, 32)
    assert torch.equal(compose_riad(ids, m)[0, 0], m[:, 0].float().argmax(0).float())


# --- losses ----------------------------------------------------------------------------------


def test_losses_vanish_on_identical_images_and_have_gradients() -> None:
    x = _images()
    total, parts = reconstruction_loss(x, x)
    assert parts["total"] < 1e-5
    y = _images(seed=1).requires_grad_(True)
    loss = msgms_loss(y, x)
    loss.backward()
    assert float(loss.detach()) > 0.05 and y.grad is not None and float(y.grad.abs().sum()) > 0


def test_loss_weights_apply() -> None:
    from reconstruction.losses import LossWeights

    x, y = _images(), _images(seed=1)
    _, p = reconstruction_loss(y, x)
    t, _ = reconstruction_loss(y, x, LossWeights(l2=2.0, ssim=0.0, msgms=0.5))
    assert abs(float(t) - (2 * p["l2"] + 0.5 * p["msgms"])) < 1e-5


def test_pixel_weight_of_ones_is_the_plain_loss_and_a_heavier_box_counts_its_error_more() -> None:
    x = _images()
    err = torch.zeros_like(x)
    err[..., 8:24, 8:24] = 0.5  # the error sits inside the "box" only
    y = (x + err).clamp(-1, 1)
    plain, _ = reconstruction_loss(y, x)
    ones, _ = reconstruction_loss(y, x, pixel_weight=torch.ones_like(x[:, :1]))
    assert abs(float(plain) - float(ones)) < 1e-5
    w = torch.ones_like(x[:, :1])
    w[..., 8:24, 8:24] = 4.0
    heavy, parts = reconstruction_loss(y, x, pixel_weight=w)
    assert float(heavy) > 1.5 * float(plain) and parts["l2"] > 0


def test_train_config_keeps_its_cache_dict_without_the_new_defaults() -> None:
    from reconstruction.train import TrainConfig

    assert "box_weight" not in TrainConfig().to_dict() and "encoder" not in TrainConfig().to_dict()["unet"]
    assert TrainConfig(box_weight=4.0).to_dict()["box_weight"] == 4.0


# --- anomaly maps ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAP_NAMES)
def test_identical_images_give_zero_deviation(name: str) -> None:
    x = _images()
    m = anomaly_map(name, x, x)
    assert m.shape == x.shape and float(m.abs().max()) < 1e-5


def test_dd_ignores_pixels_that_got_darker() -> None:
    x = _images()
    darker = (x - 0.3).clamp(-1, 1)
    assert float(anomaly_map("dd", x, darker).max()) == 0.0
    lighter = x.clone()
    lighter[..., 10:20, 10:20] = 1.0
    dd = anomaly_map("dd", x, lighter)
    assert torch.allclose(dd[..., 10:20, 10:20], (1.0 - x[..., 10:20, 10:20]) / 2)
    assert float(dd.sum()) == pytest.approx(float(dd[..., 10:20, 10:20].sum()))


@pytest.mark.parametrize("name", ["msgmsd", "gmsd", "ssim", "l2"])
def test_symmetric_maps(name: str) -> None:
    x, y = _images(), _images(seed=1)
    assert torch.allclose(anomaly_map(name, x, y), anomaly_map(name, y, x), atol=1e-6)


def test_msgmsd_is_localised_and_bounded() -> None:
    x = torch.zeros(1, 1, 64, 64)
    y = x.clone()
    y[..., 30:34, 30:34] = 1.0
    m = anomaly_map("msgmsd", x, y)
    assert 0 <= float(m.min()) and float(m.max()) <= 1
    assert float(m[..., 24:40, 24:40].mean()) > 10 * float(m[..., :8, :8].mean() + 1e-6)


SSIM_TOL = 1e-4  # float32 vs float64 and different moment orders; borders (5 px) excluded


def test_ssim_map_agrees_with_scikit_image_in_the_interior() -> None:
    x = _images(3, 48, seed=3)
    y = (x + 0.4 * _images(3, 48, seed=4)).clamp(-1, 1)
    ours = ssim_map(x.double(), y.double())[:, 0].numpy()
    for i in range(3):
        _, ref = structural_similarity(
            x[i, 0].double().numpy(),
            y[i, 0].double().numpy(),
            full=True,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=2,
        )
        assert np.abs(ours[i, 5:-5, 5:-5] - ref[5:-5, 5:-5]).max() < SSIM_TOL
    ours32 = ssim_map(x, y)[:, 0].numpy()
    assert np.abs(ours32[:, 5:-5, 5:-5] - ours[:, 5:-5, 5:-5]).max() < SSIM_TOL
    assert np.allclose(anomaly_map("ssim", x, y)[:, 0].numpy(), 1 - ours32, atol=1e-6)


# --- scores and segmentation -----------------------------------------------------------------


def test_image_score_pooling_and_region() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((4, 16, 16)).astype(np.float32)
    boxes = np.array([[0, 0, 4, 4], [2, 3, 10, 12], [5, 5, 16, 16], [np.nan] * 4], np.float32)
    for i in range(4):
        sel = box_mask(boxes[i], 16, 16) if not np.isnan(boxes[i]).any() else np.ones((16, 16), bool)
        v = np.sort(maps[i][sel])[::-1]
        k = max(1, int(np.ceil(0.1 * v.size)))
        assert image_score(maps, boxes, "mean", "box")[i] == pytest.approx(v.mean(), rel=1e-6)
        assert image_score(maps, boxes, "max", "box")[i] == pytest.approx(v.max(), rel=1e-6)
        assert image_score(maps, boxes, "topk", "box", topk_fraction=0.1)[i] == pytest.approx(v[:k].mean(), rel=1e-6)
    assert np.allclose(image_score(torch.from_numpy(maps[:, None])), maps.mean((1, 2)))


def test_segment_thresholds_then_closes_and_opens() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 32, 32)).astype(np.float32)
    assert np.array_equal(segment(maps, 0.7), close_open(maps > 0.7))
    assert np.array_equal(segment(maps, 0.7, postprocess=False), maps > 0.7)


# --- fast 3x3 median -------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_median3x3_equals_unfold_median_exactly(ties: bool) -> None:
    from reconstruction.losses import median3x3, median3x3_reference

    g = torch.Generator().manual_seed(1)
    for shape in [(2, 1, 17, 23), (1, 3, 5, 4), (3, 1, 64, 64)]:
        x = torch.rand(*shape, generator=g)
        if ties:  # few distinct values, as in flat regions and the filled box
            x = torch.randint(0, 3, shape, generator=g).float()
        assert torch.equal(median3x3(x), median3x3_reference(x))
        # the autograd path must give the same values too
        assert torch.equal(median3x3(x.clone().requires_grad_()).detach(), median3x3_reference(x))


def test_median3x3_gradient_matches_reference_without_ties() -> None:
    from reconstruction.losses import median3x3, median3x3_reference

    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 1, 12, 9, generator=g, dtype=torch.float64).requires_grad_()
    b = a.detach().clone().requires_grad_()
    w = torch.rand(2, 1, 12, 9, generator=g, dtype=torch.float64)
    (median3x3(a) * w).sum().backward()
    (median3x3_reference(b) * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-12)
    # with ties the gradient still lands on one tied pixel per window: its total is conserved
    t = torch.randint(0, 3, (1, 1, 10, 10), generator=g).double().requires_grad_()
    median3x3(t).sum().backward()
    assert torch.isclose(t.grad.sum(), torch.tensor(100.0, dtype=torch.float64))


def test_msgmsd_c170_ignores_speckle_in_flat_dark_regions() -> None:
    """GMSD's constant keeps a near-black, near-flat region (shadow, pocket) from turning into noise:
    the authors' constant makes faint speckle there look as anomalous as a real edge."""
    gen = torch.Generator().manual_seed(0)
    dark = -1 + 0.05 * torch.rand(1, 1, 32, 32, generator=gen)
    other = -1 + 0.05 * torch.rand(1, 1, 32, 32, generator=gen)
    edge = dark.clone()
    edge[..., :, 16:] += 1.0
    authors, gmsd = (float(anomaly_map(n, dark, other).mean()) for n in ("msgmsd", "msgmsd_c170"))
    assert authors > 10 * gmsd and gmsd < 0.005  # faint speckle reads as structure with the authors' c
    assert float(anomaly_map("msgmsd_c170", dark, edge).max()) > 0.5  # a real edge still counts
