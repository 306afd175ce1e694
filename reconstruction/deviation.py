"""Anomaly maps (image similarity deviations) and image scores.

Maps take ``original`` and ``reconstruction`` as ``[B, 1, H, W]`` tensors in [-1, 1] and return
``[B, 1, H, W]`` maps where larger means more anomalous:

- ``msgmsd``: ``1 - GMS`` at 4 scales, bilinearly upsampled, averaged, 3x3 mean filter.
- ``msgmsd_c170``: ``msgmsd`` with GMSD's stability constant (Xue et al. 2014, c = 170/255^2 for
  Prewitt/3 gradients of [0, 1] images), i.e. :data:`GMS_C_GMSD` = 36 x the authors' c on our
  unnormalised Prewitt gradients of [-1, 1] images. The authors' c is 36 times smaller, so flat
  and black regions (the bone shadow, the pocket's inside) turn into speckle noise; LoRIS-IB's map.
- ``gmsd``: ``1 - GMS`` at full scale, 3x3 mean filter.
- ``ssim``: ``1 - SSIM`` with the standard local SSIM (11x11 Gaussian, sigma 1.5). The authors'
  code uses a Sobel-gradient variant of SSIM; we use the textbook definition so the map can be
  checked against scikit-image (agreement to ~1e-5 away from the 5-pixel border, where padding
  differs: we reflect-pad, skimage uses scipy's symmetric 'reflect').
- ``dd``: directional difference ``max(recon - orig, 0)`` on [0, 1] intensities (paper's
  metric: only pixels the reconstruction made lighter count).
- ``l2``: squared difference on [0, 1] intensities.

>>> import torch
>>> x = torch.rand(1, 1, 32, 32) * 2 - 1
>>> [float(anomaly_map(n, x, x).abs().max()) < 1e-5 for n in MAP_NAMES]
[True, True, True, True, True, True]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reconstruction.losses import GMS_C, GMS_SCALES, gms_map, pyramid, ssim_map
from reconstruction.masking import box_masks

# GMSD's convention: the authors' c (0.0026, GMSD's 170/255^2 to 1%) rescaled to our gradients, which are
# 3 (unnormalised Prewitt) x 2 ([-1, 1] range) = 6 times larger, so c grows 36-fold.
GMS_C_GMSD = 36 * GMS_C
MapFn = Callable[[Tensor, Tensor], Tensor]
M = TypeVar("M", bound=Callable[..., Tensor])  # a map function, keeping its own keyword arguments
_MAPS: dict[str, MapFn] = {}


def register_map(name: str) -> Callable[[M], M]:
    """Make an anomaly map ``fn(original, reconstruction) -> [B, 1, H, W]`` known by ``name`` to the config
    (``maps``), inference and the reports."""

    def wrap(fn: M) -> M:
        _MAPS[name] = fn
        return fn

    return wrap


def _mean3x3(x: Tensor) -> Tensor:
    # replicate padding: border pixels average real neighbours only, and a zero map stays zero
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


@register_map("msgmsd")
def msgmsd_map(original: Tensor, reconstruction: Tensor, scales: int = GMS_SCALES, c: float = GMS_C) -> Tensor:
    """Multi-scale GMS deviation map (symmetric in its arguments)."""
    size = original.shape[-2:]
    maps = [
        F.interpolate(1 - gms_map(a, b, c), size=size, mode="bilinear", align_corners=False)
        if i
        else 1 - gms_map(a, b, c)
        for i, (a, b) in enumerate(zip(pyramid(original, scales), pyramid(reconstruction, scales)))
    ]
    return _mean3x3(torch.stack(maps).mean(dim=0))


@register_map("msgmsd_c170")
def msgmsd_c170_map(original: Tensor, reconstruction: Tensor) -> Tensor:
    """:func:`msgmsd_map` with GMSD's constant :data:`GMS_C_GMSD` (LoRIS-IB's score map)."""
    return msgmsd_map(original, reconstruction, c=GMS_C_GMSD)


@register_map("gmsd")
def gmsd_map(original: Tensor, reconstruction: Tensor, c: float = GMS_C) -> Tensor:
    """Single-scale GMS deviation map."""
    return _mean3x3(1 - gms_map(original, reconstruction, c))


@register_map("ssim")
def ssim_dev_map(original: Tensor, reconstruction: Tensor) -> Tensor:
    """``1 - SSIM`` (standard local SSIM, data range 2), in [0, 2]."""
    return 1 - ssim_map(original, reconstruction)


@register_map("dd")
def dd_map(original: Tensor, reconstruction: Tensor) -> Tensor:
    """Directional difference ``max(recon - orig, 0)`` on [0, 1] intensities: ignores pixels that got darker."""
    return ((reconstruction - original) / 2).clamp_min(0)


@register_map("l2")
def l2_map(original: Tensor, reconstruction: Tensor) -> Tensor:
    """Squared difference on [0, 1] intensities."""
    return ((reconstruction - original) / 2).pow(2)


MAP_NAMES: tuple[str, ...] = tuple(_MAPS)


def anomaly_map(name: str, original: Tensor, reconstruction: Tensor) -> Tensor:
    """Anomaly map ``[B, 1, H, W]`` named ``msgmsd|gmsd|ssim|dd|l2``; inputs ``[B, 1, H, W]`` in [-1, 1].

    >>> x = torch.zeros(1, 1, 16, 16); r = x.clone(); r[..., 4:8, 4:8] = 1
    >>> float(anomaly_map("dd", x, r).max()), float(anomaly_map("dd", r, x).max())
    (0.5, 0.0)
    """
    if name not in _MAPS:
        raise ValueError(f"unknown anomaly map {name!r}; choose from {tuple(_MAPS)}")
    return _MAPS[name](original, reconstruction)


def image_score(
    maps: Tensor | np.ndarray,
    boxes: Tensor | np.ndarray | None = None,
    pooling: Literal["mean", "max", "topk"] = "mean",
    region: Literal["image", "box"] = "image",
    topk_fraction: float = 0.01,
    margin: float = 0.0,
    inset: float = 0.0,
) -> np.ndarray:
    """Image-level scores ``[B]`` (float64) from maps ``[B, H, W]`` or ``[B, 1, H, W]``.

    ``pooling``: mean (paper default), max (authors' code) or mean of the top ``topk_fraction``
    of the pixels; ``region``: the whole image (paper) or only the box pixels (``boxes`` [B, 4]
    required; an image without a box, NaN row, falls back to the whole image). The box grows by
    ``margin`` pixels and shrinks by ``inset`` times the map's side on every edge (never below one
    pixel): the inset leaves out the seam where the inpainting meets the scan.

    >>> m = np.zeros((2, 8, 8), np.float32); m[1, 2, 2] = 64
    >>> image_score(m).tolist(), image_score(m, pooling="max").tolist()
    ([0.0, 1.0], [0.0, 64.0])
    >>> image_score(m, np.array([[0, 0, 4, 4], [4, 4, 8, 8]]), region="box").tolist()
    [0.0, 0.0]
    >>> edge = np.zeros((1, 8, 8), np.float32); edge[0, 0, 0] = 64  # a seam pixel on the box's edge
    >>> [float(image_score(edge, np.array([[0, 0, 8, 8]]), region="box", inset=i)[0]) for i in (0, 0.25)]
    [1.0, 0.0]
    """
    t = torch.as_tensor(np.asarray(maps) if isinstance(maps, np.ndarray) else maps.detach()).to(torch.float64).cpu()
    if t.dim() == 4:
        t = t[:, 0]
    b, h, w = t.shape
    if region == "box":
        if boxes is None:
            raise ValueError("region='box' needs boxes")
        sel = box_masks(boxes, h, w, margin - inset * min(h, w))[:, 0]
        sel = sel | ~sel.flatten(1).any(1).view(-1, 1, 1)  # no box: whole image
    elif region == "image":
        sel = torch.ones_like(t, dtype=torch.bool)
    else:
        raise ValueError(f"unknown region {region!r}")
    flat, keep = t.flatten(1), sel.flatten(1)
    count = keep.sum(1).to(torch.float64)
    if pooling == "mean":
        out = (flat * keep).sum(1) / count
    elif pooling == "max":
        out = flat.masked_fill(~keep, -torch.inf).amax(1)
    elif pooling == "topk":
        # sort once per batch; per-image k differs when regions differ, so gather the k-th cumsum
        vals = flat.masked_fill(~keep, -torch.inf).sort(dim=1, descending=True).values.nan_to_num(neginf=0.0)
        k = torch.clamp(torch.ceil(count * topk_fraction), min=1).long()
        out = vals.cumsum(1).gather(1, (k - 1).view(-1, 1)).squeeze(1) / k
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return out.numpy()
