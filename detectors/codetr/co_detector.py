"""Co-DINO detector (Co-DETR with a DINO query head) on mmdet 3.3.0 parts.

Training: backbone -> neck -> deformable encoder -> DINO decoder with denoising (one-to-one),
plus auxiliary one-to-many heads on the encoder memory reshaped back into feature maps with one
extra stride-2 level: RPN + Faster R-CNN RoI head, and ATSS. Each auxiliary head's positives
become customised positive queries (sine box embedding -> per-head Linear + LayerNorm) decoded by
the shared decoder; their losses are added. Inference is the DINO query head alone, so the
auxiliary heads cost nothing at test time.

Nothing here names a device: tensors are created with ``new_*``/``device=`` from their inputs,
so the model runs wherever its parameters are.
"""

from __future__ import annotations

from typing import Any

import torch
from mmdet.models.detectors import DINO
from mmdet.models.layers import DeformableDetrTransformerEncoder, SinePositionalEncoding
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample, SampleList
from mmdet.structures.bbox import bbox_xyxy_to_cxcywh
from mmengine.config import ConfigDict
from torch import Tensor, nn

from detectors.codetr.aux_heads import Assignment
from detectors.codetr.co_dino_head import PositiveQueries
from detectors.codetr.fused import FusedCache
from detectors.codetr.query_embed import LorisDinoDecoder, PositiveQueryEmbed


@MODELS.register_module()
class LorisCoDINO(DINO):
    """Co-DINO. With no auxiliary heads configured it is plain DINO (the ablation).

    Args:
        rpn_head: RPNHead config with its own ``train_cfg``/``test_cfg``; needs ``roi_head``.
        rpn_proposal: proposal settings used while training (NMS, how many to keep).
        roi_head: RoI head config (``LorisCoRoIHead``) with ``train_cfg``/``test_cfg``.
        atss_head: ATSS head config (``LorisCoATSSHead``) with ``train_cfg``/``test_cfg``.
        max_pos_queries: cap on positive queries per image and head (Co-DETR: 300).
        min_pos_queries: pad to at least this many queries with background ones (Co-DETR: 9).
        Other arguments are mmdet's ``DINO``'s.
    """

    # Set by _init_layers from the configs of the same names (mmdet builds them in place).
    embed_dims: int
    positional_encoding: Any
    encoder: Any
    decoder: Any

    def __init__(
        self,
        *args,
        rpn_head: dict | None = None,
        rpn_proposal: dict | None = None,
        roi_head: dict | None = None,
        atss_head: dict | None = None,
        max_pos_queries: int = 300,
        min_pos_queries: int = 9,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if (rpn_head is None) != (roi_head is None):
            raise ValueError("rpn_head and roi_head come together (Faster R-CNN auxiliary branch)")
        self.max_pos_queries = max_pos_queries
        self.min_pos_queries = min_pos_queries
        # mmdet's proposal post-processing reads cfg.nms / cfg.min_bbox_size as attributes.
        self.rpn_proposal = ConfigDict(rpn_proposal or {})
        self.rpn_head = MODELS.build(rpn_head) if rpn_head is not None else None
        self.roi_head = MODELS.build(roi_head) if roi_head is not None else None
        self.atss_head = MODELS.build(atss_head) if atss_head is not None else None
        self.aux_names: list[str] = (["rcnn"] if self.roi_head is not None else []) + (
            ["atss"] if self.atss_head is not None else []
        )
        if self.aux_names:
            # The extra level the auxiliary heads see below the encoder's coarsest one.
            self.aux_downsample = nn.Sequential(
                nn.Conv2d(self.embed_dims, self.embed_dims, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(min(32, self.embed_dims // 2), self.embed_dims),
            )
            self.pos_query_embed = PositiveQueryEmbed(self.embed_dims, len(self.aux_names))

    def extract_feat(self, batch_inputs: Tensor) -> tuple[Tensor, ...]:
        """Backbone and neck features; CPU inference runs a BatchNorm-folded, channels-last backbone copy."""
        if self.training or torch.is_grad_enabled() or batch_inputs.device.type != "cpu":
            return super().extract_feat(batch_inputs)
        cache = self.__dict__.setdefault("_fused_backbone", FusedCache())  # not a submodule: no state_dict keys
        feats = cache.get(self.backbone)(batch_inputs.contiguous(memory_format=torch.channels_last))
        feats = tuple(f.contiguous() for f in feats)
        return self.neck(feats) if self.with_neck else feats

    @property
    def with_aux(self) -> bool:
        """Whether any one-to-many auxiliary head is attached."""
        return bool(self.aux_names)

    def _init_layers(self) -> None:
        """DINO's layers, with the decoder swapped for the width-agnostic one."""
        self.positional_encoding = SinePositionalEncoding(**self.positional_encoding)
        self.encoder = DeformableDetrTransformerEncoder(**self.encoder)
        self.decoder = LorisDinoDecoder(**self.decoder)
        self.embed_dims = self.encoder.embed_dims
        self.query_embedding = nn.Embedding(self.num_queries, self.embed_dims)
        if self.positional_encoding.num_feats * 2 != self.embed_dims:
            raise ValueError("positional_encoding.num_feats must be embed_dims // 2")
        self.level_embed = nn.Parameter(torch.empty(self.num_feature_levels, self.embed_dims))
        self.memory_trans_fc = nn.Linear(self.embed_dims, self.embed_dims)
        self.memory_trans_norm = nn.LayerNorm(self.embed_dims)

    # ------------------------------------------------------------------ training
    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> dict[str, Tensor]:
        """All training losses: DINO's (matching, denoising, encoder) then the auxiliary ones."""
        img_feats = self.extract_feat(batch_inputs)
        enc_in, dec_in = self.pre_transformer(img_feats, batch_data_samples)
        enc_out = self.forward_encoder(**enc_in)
        tmp_dec_in, head_in = self.pre_decoder(**enc_out, batch_data_samples=batch_data_samples)
        dec_in.update(tmp_dec_in)
        head_in.update(self.forward_decoder(**dec_in))
        losses = self.bbox_head.loss(**head_in, batch_data_samples=batch_data_samples)
        if not self.with_aux:
            return losses

        maps = self._memory_to_maps(enc_out["memory"], enc_out["spatial_shapes"])
        assignments: list[tuple[str, Assignment]] = []
        if self.roi_head is not None and self.rpn_head is not None:  # they come together
            rpn_samples = self._class_agnostic(batch_data_samples)
            rpn_losses, proposals = self.rpn_head.loss_and_predict(maps, rpn_samples, proposal_cfg=self.rpn_proposal)
            losses.update({k if "rpn" in k else f"rpn.{k}": v for k, v in rpn_losses.items()})
            roi_losses, assignment = self.roi_head.loss_with_assignment(maps, proposals, batch_data_samples)
            losses.update({f"rcnn.{k}": v for k, v in roi_losses.items()})
            assignments.append(("rcnn", assignment))
        if self.atss_head is not None:
            atss_losses, assignment = self.atss_head.loss_with_assignment(maps, batch_data_samples)
            losses.update({f"atss.{k}": v for k, v in atss_losses.items()})
            assignments.append(("atss", assignment))

        img_metas = [s.metainfo for s in batch_data_samples]
        for head_idx, (name, assignment) in enumerate(assignments):
            queries = self._positive_queries(assignment, img_metas)
            content = self.pos_query_embed(queries.boxes, head_idx)
            # Positive queries see the encoder memory only: no denoising part, no attention mask.
            hidden, refs = self.decoder(
                query=content,
                value=enc_out["memory"],
                key_padding_mask=enc_out["memory_mask"],
                self_attn_mask=None,
                reference_points=queries.boxes,
                spatial_shapes=dec_in["spatial_shapes"],
                level_start_index=dec_in["level_start_index"],
                valid_ratios=dec_in["valid_ratios"],
                reg_branches=self.bbox_head.reg_branches,
            )
            losses.update(self.bbox_head.loss_positive_queries(hidden, refs, queries, img_metas, prefix=f"pos_{name}"))
        return losses

    def _memory_to_maps(self, memory: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, ...]:
        """Encoder memory ``[bs, sum(h*w), d]`` back to per-level maps, plus one stride-2 level."""
        bs, _, d = memory.shape
        maps, start = [], 0
        for h, w in spatial_shapes.tolist():
            maps.append(memory[:, start : start + h * w].transpose(1, 2).reshape(bs, d, h, w))
            start += h * w
        maps.append(self.aux_downsample(maps[-1]))
        return tuple(maps)

    @staticmethod
    def _class_agnostic(batch_data_samples: SampleList) -> SampleList:
        """Copies of the samples with every gt label 0, as the RPN is objectness-only."""
        out = []
        for s in batch_data_samples:
            c = DetDataSample(metainfo=s.metainfo)
            gt = s.gt_instances.clone()
            gt.labels = torch.zeros_like(gt.labels)
            c.gt_instances = gt
            out.append(c)
        return out

    def _positive_queries(self, a: Assignment, img_metas: list[dict]) -> PositiveQueries:
        """Fixed-target queries: each image's positives (capped), padded with its negatives."""
        num_classes = self.bbox_head.num_classes
        n_pos = [int(((lab >= 0) & (lab < num_classes)).sum()) for lab in a.labels]
        k = max(self.min_pos_queries, min(self.max_pos_queries, max(n_pos)))
        boxes, labels, targets, bbox_w = [], [], [], []
        for priors, lab, tgt, meta in zip(a.priors, a.labels, a.targets, img_metas):
            dev = priors.device
            h, w = meta["img_shape"]
            scale = priors.new_tensor([w, h, w, h])
            pos = torch.nonzero((lab >= 0) & (lab < num_classes)).squeeze(1)
            neg = torch.nonzero(lab == num_classes).squeeze(1)
            if pos.numel() > k:
                pos = pos[torch.randperm(pos.numel(), device=dev)[:k]]
            neg = neg[torch.randperm(neg.numel(), device=dev)[: k - pos.numel()]]
            idx = torch.cat([pos, neg])
            box = bbox_xyxy_to_cxcywh(priors[idx] / scale).clamp(0.0, 1.0)
            tg = bbox_xyxy_to_cxcywh(tgt[idx] / scale)
            lb = lab[idx]
            bw = box.new_zeros((idx.numel(), 4))
            bw[: pos.numel()] = 1.0
            short = k - idx.numel()
            if short > 0:
                # Too few negatives to pad with: add whole-image background queries.
                box = torch.cat([box, box.new_tensor([[0.5, 0.5, 1.0, 1.0]]).expand(short, 4)])
                tg = torch.cat([tg, tg.new_zeros((short, 4))])
                lb = torch.cat([lb, lb.new_full((short,), num_classes)])
                bw = torch.cat([bw, bw.new_zeros((short, 4))])
            boxes.append(box)
            labels.append(lb)
            targets.append(tg)
            bbox_w.append(bw)
        boxes_t = torch.stack(boxes)
        return PositiveQueries(
            boxes=boxes_t,
            labels=torch.stack(labels),
            targets=torch.stack(targets),
            label_weights=boxes_t.new_ones(boxes_t.shape[:2]),
            bbox_weights=torch.stack(bbox_w),
        )
