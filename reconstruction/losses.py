"""Training losses: MSGMS, SSIM and L2, vectorised over ``[B, 1, H, W]`` tensors in [-1, 1].

Constants follow the authors' code (docs/design.md): GMS uses a 3x3 median prefilter, unnormalised
Prewitt kernels and ``c = 0.0026``; MSGMS averages 4 scales made by 2x2 average pooling; SSIM
uses an 11x11 Gaussian window (sigma 1.5), ``k1 = 0.01``, ``k2 = 0.03`` and data range 2.

>>> import torch
>>> x = torch.rand(2, 1, 32, 32) * 2 - 1
>>> float(msgms_loss(x, x)) < 1e-6, float(ssim_loss(x, x)) < 1e-6
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

GMS_C = 0.0026
GMS_SCALES = 4
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 2.0  # images live in [-1, 1]
_EPS = 1e-12  # keeps sqrt differentiable where the gradient magnitude is 0

_PREWITT_X = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]])


def _sort3(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    mid, hi = torch.minimum(hi, c), torch.maximum(hi, c)
    return torch.minimum(lo, mid), torch.maximum(lo, mid), hi


def _med3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def _median9_padded(p: Tensor) -> Tensor:
    """Exact 3x3 median of a reflect-padded ``[..., H+2, W+2]`` tensor by min/max only.

    Sorting each horizontal triple and then the columns of the 3x3 block puts the median on the
    anti-diagonal: ``med3(max(lows), med3(mids), min(highs))``. The horizontal sort is shared by
    the three rows of every window, so the whole filter is ~20 element-wise ops instead of a
    9x unfold copy plus a sort (far faster on a CPU).
    """
    h, w = p.shape[-2] - 2, p.shape[-1] - 2
    lo, mid, hi = _sort3(p[..., 0:w], p[..., 1 : w + 1], p[..., 2 : w + 2])  # [..., H+2, W]
    rows = (slice(0, h), slice(1, h + 1), slice(2, h + 2))
    max_lo = torch.maximum(torch.maximum(lo[..., rows[0], :], lo[..., rows[1], :]), lo[..., rows[2], :])
    min_hi = torch.minimum(torch.minimum(hi[..., rows[0], :], hi[..., rows[1], :]), hi[..., rows[2], :])
    med_mid = _med3(mid[..., rows[0], :], mid[..., rows[1], :], mid[..., rows[2], :])
    return _med3(max_lo, med_mid, min_hi)


class _Median9(torch.autograd.Function):
    """Median of the 3x3 windows of a padded tensor; the gradient goes to one window pixel equal to the median.

    Autograd through the min/max network would split the gradient at ties and cost ~10x the
    forward. Like ``Tensor.median``'s backward (which routes it to the one index it returns),
    this sends each window's gradient to a single pixel: the first match in row-major order.
    """

    @staticmethod
    def forward(ctx: Any, p: Tensor) -> Tensor:  # noqa: D102
        m = _median9_padded(p)
        ctx.save_for_backward(p, m)
        return m

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        p, m = ctx.saved_tensors
        h, w = m.shape[-2:]
        gp = torch.zeros_like(p)
        free = torch.ones_like(m, dtype=torch.bool)  # windows whose gradient is not yet placed
        for dy in range(3):
            for dx in range(3):
                hit = free & (p[..., dy : dy + h, dx : dx + w] == m)
                gp[..., dy : dy + h, dx : dx + w] += grad * hit
                free &= ~hit
        return gp


def median3x3(x: Tensor) -> Tensor:
    """3x3 median filter per channel (reflect padding keeps borders free of fake edges).

    Values equal :func:`median3x3_reference` exactly; gradients agree except at exact ties,
    where either picks one of the tied pixels.

    >>> x = torch.zeros(1, 1, 5, 5); x[0, 0, 2, 2] = 1
    >>> float(median3x3(x).max())
    0.0
    """
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    if torch.is_grad_enabled() and p.requires_grad:
        return _Median9.apply(p)
    return _median9_padded(p)


def median3x3_reference(x: Tensor) -> Tensor:
    """The straightforward 3x3 median (unfold + ``median``), kept as the specification for tests."""
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    patches = p.unfold(2, 3, 1).unfold(3, 3, 1)  # [B, C, H, W, 3, 3]
    return patches.reshape(*x.shape, 9).median(dim=-1).values


def gradient_magnitude(x: Tensor) -> Tensor:
    """Prewitt (unnormalised) gradient magnitude ``sqrt(gx^2 + gy^2 + eps)`` of ``[B, 1, H, W]``."""
    kx = _PREWITT_X.to(x)
    k = torch.stack([kx, kx.t()]).unsqueeze(1)  # [2, 1, 3, 3]: both directions in one conv
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k)
    return torch.sqrt(g.pow(2).sum(dim=1, keepdim=True) + _EPS)


def gms_map(x: Tensor, y: Tensor, c: float = GMS_C, median: bool = True) -> Tensor:
    """Gradient magnitude similarity ``(2 g1 g2 + c) / (g1^2 + g2^2 + c)`` in (0, 1], symmetric in x and y."""
    if median:
        x, y = median3x3(x), median3x3(y)
    g1, g2 = gradient_magnitude(x), gradient_magnitude(y)
    return (2 * g1 * g2 + c) / (g1.pow(2) + g2.pow(2) + c)


def pyramid(x: Tensor, scales: int = GMS_SCALES) -> list[Tensor]:
    """``[x, x/2, x/4, ...]`` by 2x2 average pooling."""
    out = [x]
    for _ in range(scales - 1):
        out.append(F.avg_pool2d(out[-1], 2))
    return out


def weighted_mean(v: Tensor, w: Tensor | None) -> Tensor:
    """``mean(v)``, or the ``w``-weighted mean when a pixel weight ``w`` (broadcast to ``v``) is given."""
    if w is None:
        return v.mean()
    w = w.expand_as(v)
    return (v * w).sum() / w.sum()


def msgms_loss(
    x: Tensor, y: Tensor, scales: int = GMS_SCALES, c: float = GMS_C, weight: Tensor | None = None
) -> Tensor:
    """Mean over scales of ``mean(1 - GMS)`` (``weight``-weighted, pooled down the pyramid, when given).

    >>> x = torch.rand(1, 1, 32, 32, requires_grad=True)
    >>> msgms_loss(x, torch.rand(1, 1, 32, 32)).backward(); x.grad is not None
    True
    """
    ws = pyramid(weight, scales) if weight is not None else [None] * scales
    pairs = zip(pyramid(x, scales), pyramid(y, scales), ws)
    return torch.stack([weighted_mean(1 - gms_map(a, b, c), w) for a, b, w in pairs]).mean()


def gaussian_window(
    size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (used separably)."""
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: Tensor, g: Tensor) -> Tensor:
    # separable Gaussian, reflect padding so the map keeps the image size
    r = g.numel() // 2
    x = F.pad(x, (r, r, r, r), mode="reflect")
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim_map(
    x: Tensor,
    y: Tensor,
    data_range: float = DATA_RANGE,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> Tensor:
    """Local SSIM map ``[B, 1, H, W]`` (population covariances, Gaussian window, reflect borders).

    Matches scikit-image ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` away from the borders.
    """
    g = gaussian_window(window, sigma, x.device, x.dtype)
    # one grouped blur over the five moments instead of five separate convolutions
    stats = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
    mx, my, sxx, syy, sxy = stats.split(x.shape[1], dim=1)
    vx, vy, cxy = sxx - mx * mx, syy - my * my, sxy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim_loss(x: Tensor, y: Tensor, data_range: float = DATA_RANGE, weight: Tensor | None = None) -> Tensor:
    """``1 - mean(SSIM map)`` (``weight``-weighted when given)."""
    return 1 - weighted_mean(ssim_map(x, y, data_range), weight)


def l2_loss(x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error (``weight``-weighted when given)."""
    return F.mse_loss(x, y) if weight is None else weighted_mean((x - y).pow(2), weight)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three loss terms (paper: 1, 1, 1)."""

    l2: float = 1.0
    ssim: float = 1.0
    msgms: float = 1.0


def reconstruction_loss(
    recon: Tensor, target: Tensor, weights: LossWeights = LossWeights(), pixel_weight: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """``w_l2 L2 + w_ssim L_SSIM + w_msgms L_MSGMS`` over the whole image; returns the total and each part.

    ``pixel_weight`` (``[B, 1, H, W]``, e.g. heavier inside the masked box) turns each term's mean
    into a weighted mean; None keeps the paper's plain means.

    >>> x = torch.rand(2, 1, 32, 32) * 2 - 1
    >>> total, parts = reconstruction_loss(x, x); sorted(parts)
    ['l2', 'msgms', 'ssim', 'total']
    """
    l2 = l2_loss(recon, target, weight=pixel_weight)
    ss = ssim_loss(recon, target, weight=pixel_weight)
    ms = msgms_loss(recon, target, weight=pixel_weight)
    total = weights.l2 * l2 + weights.ssim * ss + weights.msgms * ms
    parts = {
        "l2": float(l2.detach()),
        "ssim": float(ss.detach()),
        "msgms": float(ms.detach()),
        "total": float(total.detach()),
    }
    return total, parts
