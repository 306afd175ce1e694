"""A faster CPU inference path for mmcv's ``MultiScaleDeformableAttention`` (the same arithmetic, reordered).

mmcv's forward keeps the ``levels x points`` axis innermost, where PyTorch's CPU kernels are slow for
Co-DINO's 12 entries (softmax, the weighted sum and the broadcast offset division each cost several
times a contiguous pass). Here the sampling grid and the attention weights are laid out
``[batch x heads, levels x points, queries]``, so every reduction runs along a long contiguous axis and
``grid_sample`` writes its output where the weighted sum reads it. The result equals mmcv's to float32
rounding (tests/detectors/test_codetr.py compares them; docs/design.md, "Facts the code relies on").

Only inference on CPU tensors takes this path (no autograd graph is recorded, so training is untouched);
anything else calls mmcv's own forward.

>>> install(); installed()
True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_ORIGINAL: dict[str, Any] = {}


def _applies(query: Tensor) -> bool:
    return not torch.is_grad_enabled() and query.device.type == "cpu" and not query.is_cuda


def deformable_attention(
    module: Any,
    query: Tensor,
    value: Tensor,
    reference_points: Tensor,
    spatial_shapes: Tensor,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """mmcv ``MultiScaleDeformableAttention`` between ``query`` ``[bs, nq, embed]`` (positions already added)
    and ``value`` ``[bs, nv, embed]``, before ``output_proj``: ``[bs, nq, embed]``."""
    bs, nq, _ = query.shape
    heads, levels, points = module.num_heads, module.num_levels, module.num_points
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value = module.value_proj(value)
    if key_padding_mask is not None:
        value = value.masked_fill(key_padding_mask[..., None], 0.0)
    dims = value.shape[-1] // heads
    # [bs, nv, heads, dims] -> [bs, heads, dims, nv]: one copy, then each level is a slice
    value = value.view(bs, -1, heads, dims).permute(0, 2, 3, 1)
    lp = levels * points
    logits = module.attention_weights(query).view(bs, nq, heads, lp).permute(0, 2, 3, 1)
    weights = logits.softmax(2).reshape(bs * heads, 1, lp, nq)
    # the linear layer's fresh output is updated in place: large temporaries cost page faults
    offsets = module.sampling_offsets(query).view(bs, nq, heads, levels, points * 2)
    if reference_points.shape[-1] == 2:
        wh = spatial_shapes.flip(-1).to(offsets.dtype)  # (w, h) per level
        loc = offsets.div_(wh.repeat(1, points)).add_(reference_points.repeat(1, 1, 1, points)[:, :, None])
    elif reference_points.shape[-1] == 4:
        ref = reference_points[:, :, None]  # [bs, nq, 1, levels, 4]
        size = ref[..., 2:].repeat(1, 1, 1, 1, points)
        loc = offsets.div_(points).mul_(size).mul_(0.5).add_(ref[..., :2].repeat(1, 1, 1, 1, points))
    else:
        raise ValueError(f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} instead.")
    # [bs, nq, heads, levels, points, 2] -> [bs, heads, levels, points, nq, 2], in grid_sample's [-1, 1]
    grid = loc.mul_(2).sub_(1).view(bs, nq, heads, levels, points, 2).permute(0, 2, 3, 4, 1, 5).contiguous()
    out: Tensor | None = None  # [bs * heads, dims, nq]: the attention-weighted sum, accumulated point by point
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[..., start : start + h * w].reshape(bs * heads, dims, h, w)
        start += h * w
        g = grid[:, :, lvl].reshape(bs * heads, points, nq, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        for p in range(points):
            a = weights[:, :, lvl * points + p]
            out = sampled[:, :, p] * a if out is None else out.addcmul_(sampled[:, :, p], a)
    assert out is not None
    return out.view(bs, heads * dims, nq).transpose(1, 2).contiguous()


def _forward(
    self: Any,
    query: Tensor,
    key: Tensor | None = None,
    value: Tensor | None = None,
    identity: Tensor | None = None,
    query_pos: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    reference_points: Tensor | None = None,
    spatial_shapes: Tensor | None = None,
    level_start_index: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    if not _applies(query) or reference_points is None or spatial_shapes is None:
        return _ORIGINAL["forward"](
            self,
            query,
            key=key,
            value=value,
            identity=identity,
            query_pos=query_pos,
            key_padding_mask=key_padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            **kwargs,
        )
    if value is None:
        value = query
    if identity is None:
        identity = query
    if query_pos is not None:
        query = query + query_pos
    if not self.batch_first:
        query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
    out = self.output_proj(deformable_attention(self, query, value, reference_points, spatial_shapes, key_padding_mask))
    if not self.batch_first:
        out = out.permute(1, 0, 2)
    return self.dropout(out) + identity


def install() -> None:
    """Route ``MultiScaleDeformableAttention.forward`` through this module's inference path; idempotent."""
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention

    if not _ORIGINAL:
        _ORIGINAL["forward"] = MultiScaleDeformableAttention.forward
        MultiScaleDeformableAttention.forward = _forward


def uninstall() -> None:
    """Undo :func:`install` (a no-op when it is not in effect)."""
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention

    if _ORIGINAL:
        MultiScaleDeformableAttention.forward = _ORIGINAL.pop("forward")


def installed() -> bool:
    return bool(_ORIGINAL)
