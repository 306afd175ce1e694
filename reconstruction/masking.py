"""Masks for reconstruction-by-inpainting: LoRIS's single box mask and RIAD's disjoint grid masks.

Images here are ``[B, 1, H, W]`` tensors in [-1, 1]; masked pixels are filled with -1 (black),
as in the authors' code. Box pixels follow :func:`scans.records.box_to_pixels` (corners
inclusive), vectorised over a batch.

>>> import torch
>>> m = box_masks(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 6, 6)
>>> m[0, 0].int().tolist()[2]
[0, 1, 1, 0, 0, 0]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FILL_VALUE = -1.0


def box_pixel_bounds(boxes: Tensor | np.ndarray, height: int, width: int, margin: float = 0.0) -> tuple[Tensor, Tensor]:
    """Inclusive pixel bounds ``(c0, r0, c1, r1)`` per box, batched, plus a validity flag.

    Same rule as :func:`scans.records.box_to_pixels` after growing each box by ``margin``
    pixels on every side. Rows containing NaN are invalid (no box) and mask nothing.

    >>> b, ok = box_pixel_bounds(np.array([[10.0, 20.0, 30.0, 25.0]]), 64, 64)
    >>> b.tolist(), ok.tolist()
    ([[10, 20, 29, 24]], [True])
    """
    b = (
        torch.as_tensor(np.asarray(boxes, dtype=np.float64) if isinstance(boxes, np.ndarray) else boxes)
        .to(torch.float64)
        .reshape(-1, 4)
    )
    valid = ~torch.isnan(b).any(dim=1)
    b = torch.nan_to_num(b, nan=0.0)
    x1, y1, x2, y2 = b[:, 0] - margin, b[:, 1] - margin, b[:, 2] + margin, b[:, 3] + margin
    c0 = torch.floor(x1).clamp(0, width - 1)
    r0 = torch.floor(y1).clamp(0, height - 1)
    c1 = torch.minimum(torch.maximum(torch.ceil(x2) - 1, c0), torch.tensor(width - 1.0, dtype=b.dtype))
    r1 = torch.minimum(torch.maximum(torch.ceil(y2) - 1, r0), torch.tensor(height - 1.0, dtype=b.dtype))
    return torch.stack([c0, r0, c1, r1], dim=1).long(), valid


def box_masks(
    boxes: Tensor | np.ndarray, height: int, width: int, margin: float = 0.0, device: torch.device | str | None = None
) -> Tensor:
    """Boolean ``[B, 1, H, W]`` masks of the box pixels (broadcast comparisons, no loops).

    >>> box_masks(np.array([[0.0, 0.0, 2.0, 2.0], [np.nan] * 4]), 4, 4).sum((1, 2, 3)).tolist()
    [4, 0]
    """
    bounds, valid = box_pixel_bounds(boxes, height, width, margin)
    bounds, valid = bounds.to(device), valid.to(device)
    rows = torch.arange(height, device=bounds.device).view(1, height, 1)
    cols = torch.arange(width, device=bounds.device).view(1, 1, width)
    c0, r0, c1, r1 = (bounds[:, i].view(-1, 1, 1) for i in range(4))
    m = (rows >= r0) & (rows <= r1) & (cols >= c0) & (cols <= c1) & valid.view(-1, 1, 1)
    return m.unsqueeze(1)


def apply_single_mask(images: Tensor, boxes: Tensor | np.ndarray, margin: float = 0.0) -> tuple[Tensor, Tensor]:
    """LoRIS single mask: fill each image's box with -1. Returns ``(masked, mask[B, 1, H, W])``.

    >>> x = torch.zeros(1, 1, 4, 4)
    >>> masked, m = apply_single_mask(x, np.array([[1.0, 1.0, 3.0, 3.0]]))
    >>> float(masked.sum()), int(m.sum())
    (-4.0, 4)
    """
    h, w = images.shape[-2:]
    m = box_masks(boxes, h, w, margin, device=images.device)
    return images.masked_fill(m, FILL_VALUE), m


def riad_masks(
    height: int,
    width: int,
    k: int,
    n_masks: int = 3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """RIAD disjoint masks: ``[n_masks, 1, H, W]`` bool, True where masked; together they partition the image.

    The image is cut into ``k x k`` cells; a random permutation of the cells is split into
    ``n_masks`` nearly equal parts (as RIAD's ``np.array_split``), one part per mask.

    >>> m = riad_masks(8, 8, 2, generator=torch.Generator().manual_seed(0))
    >>> m.shape, bool((m.sum(0) == 1).all())
    (torch.Size([3, 1, 8, 8]), True)
    """
    gh, gw = -(-height // k), -(-width // k)
    n_cells = gh * gw
    perm = torch.randperm(n_cells, generator=generator)
    # rank j in the permutation goes to part j * n // n_cells: contiguous, nearly equal parts
    part = torch.empty(n_cells, dtype=torch.long)
    part[perm] = torch.arange(n_cells) * n_masks // n_cells
    grid = part.view(gh, gw).repeat_interleave(k, 0).repeat_interleave(k, 1)[:height, :width].to(device)
    return (grid.unsqueeze(0) == torch.arange(n_masks, device=grid.device).view(-1, 1, 1)).unsqueeze(1)


def apply_riad_masks(images: Tensor, masks: Tensor) -> Tensor:
    """Every image under every mask: ``[B, 1, H, W]`` x ``[n, 1, H, W]`` -> ``[B * n, 1, H, W]`` (image-major).

    >>> apply_riad_masks(torch.zeros(2, 1, 4, 4), riad_masks(4, 4, 2)).shape
    torch.Size([6, 1, 4, 4])
    """
    out = images.unsqueeze(1).masked_fill(masks.unsqueeze(0), FILL_VALUE)
    return out.reshape(-1, *images.shape[1:])


def compose_riad(outputs: Tensor, masks: Tensor) -> Tensor:
    """Join per-mask reconstructions ``[B * n, 1, H, W]``: each pixel comes from the pass that masked it.

    >>> m = riad_masks(4, 4, 2); out = torch.arange(3.0).repeat(2).view(6, 1, 1, 1).expand(6, 1, 4, 4)
    >>> compose_riad(out, m).shape
    torch.Size([2, 1, 4, 4])
    """
    n = masks.shape[0]
    out = outputs.reshape(-1, n, *outputs.shape[1:])
    return (out * masks.unsqueeze(0).to(out.dtype)).sum(dim=1)
