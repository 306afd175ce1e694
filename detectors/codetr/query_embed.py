"""Query-side building blocks of Co-DINO: a width-agnostic DINO decoder and the positive-query embedder.

mmdet 3.3.0's ``DinoTransformerDecoder`` encodes reference boxes with ``coordinate_to_encoding``'s
default of 128 features per coordinate, which only fits ``embed_dims == 256``; the CPU config uses
64, so the decoder here passes ``num_feats = embed_dims // 2`` explicitly.

The positive-query embedder turns the boxes an auxiliary head assigned as positives into decoder
content queries: sine embedding of the (normalised, inverse-sigmoid) box -> Linear -> LayerNorm,
one projection per auxiliary head, as in Co-DETR's "customised positive queries".
"""

from __future__ import annotations

import math

import torch
from mmdet.models.layers import DinoTransformerDecoder
from mmdet.models.layers.transformer.utils import coordinate_to_encoding, inverse_sigmoid
from mmdet.registry import MODELS
from torch import Tensor, nn


@MODELS.register_module()
class LorisDinoDecoder(DinoTransformerDecoder):
    """DINO decoder whose reference-box sine encoding matches any ``embed_dims``."""

    def forward(
        self,
        query: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        reg_branches: nn.ModuleList,
        **kwargs,
    ) -> tuple[Tensor, Tensor]:
        """Decode ``query`` [bs, nq, d] around ``reference_points`` [bs, nq, 4] (cx, cy, w, h in [0, 1]).

        Returns the normalised hidden states of every layer ``[L, bs, nq, d]`` and the references
        ``[L + 1, bs, nq, 4]`` (the initial one first), as mmdet's DINO head expects.
        """
        num_feats = self.embed_dims // 2
        hidden_states: list[Tensor] = []
        references: list[Tensor] = [reference_points]
        # Two copies of the (w, h) ratios so the scaling covers all four box coordinates.
        ratio4 = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for lid, layer in enumerate(self.layers):
            ref_input = reference_points[:, :, None] * ratio4
            query_pos = self.ref_point_head(coordinate_to_encoding(ref_input[:, :, 0, :], num_feats=num_feats))
            query = layer(
                query,
                query_pos=query_pos,
                value=value,
                key_padding_mask=key_padding_mask,
                self_attn_mask=self_attn_mask,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                valid_ratios=valid_ratios,
                reference_points=ref_input,
                **kwargs,
            )
            # Iterative box refinement: each layer predicts a delta in logit space; the refined
            # box is detached for the next layer (DINO's "look forward once" keeps the
            # undetached one for this layer's loss).
            refined = (reg_branches[lid](query) + inverse_sigmoid(reference_points, eps=1e-3)).sigmoid()
            reference_points = refined.detach()
            hidden_states.append(self.norm(query))
            references.append(refined)
        return torch.stack(hidden_states), torch.stack(references)


def box_sine_embedding(boxes_unact: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine embedding of logit-space boxes ``[..., 4]`` -> ``[..., 4 * num_feats]``.

    The box is squashed with a sigmoid first so the embedding sees coordinates in [0, 1], scaled
    to one period of 2 pi, like the two-stage proposal embedding of Deformable DETR.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes_unact.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = boxes_unact.sigmoid()[..., None] * (2 * math.pi) / dim_t
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return pos.flatten(-2)


class PositiveQueryEmbed(nn.Module):
    """Per-auxiliary-head projection of positive boxes into decoder content queries."""

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        # The sine embedding has 4 coordinates x (embed_dims // 2) features = 2 * embed_dims.
        self.proj = nn.ModuleList(nn.Linear(2 * embed_dims, embed_dims) for _ in range(num_heads))
        self.norm = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(num_heads))

    def forward(self, boxes: Tensor, head_idx: int) -> Tensor:
        """Content queries ``[bs, K, d]`` for normalised cxcywh ``boxes`` ``[bs, K, 4]`` of one head."""
        emb = box_sine_embedding(inverse_sigmoid(boxes, eps=1e-3), self.embed_dims // 2)
        return self.norm[head_idx](self.proj[head_idx](emb))
