"""Co-DINO query head: mmdet's DINO head plus the loss of auxiliary positive queries.

The one-to-one part (Hungarian matching, denoising queries, encoder proposals) is mmdet 3.3.0's
``DINOHead`` unchanged. Co-DETR adds queries whose targets are fixed by an auxiliary head's
assignment (one-to-many), so their loss needs no matching: :meth:`loss_positive_queries`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mmdet.models.dense_heads import DINOHead
from mmdet.models.losses import QualityFocalLoss
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_overlaps
from torch import Tensor


@dataclass
class PositiveQueries:
    """Fixed-target queries built from one auxiliary head's assignment (all ``[bs, K, ...]``).

    ``boxes``/``targets`` are normalised (cx, cy, w, h); ``labels`` use ``num_classes`` for the
    background padding; ``bbox_weights`` is 1 on positives only.
    """

    boxes: Tensor
    labels: Tensor
    targets: Tensor
    label_weights: Tensor
    bbox_weights: Tensor


@MODELS.register_module()
class LorisCoDINOHead(DINOHead):
    """``DINOHead`` that can also score decoder outputs against fixed (one-to-many) targets."""

    def loss_positive_queries(
        self,
        hidden_states: Tensor,
        references: list[Tensor] | Tensor,
        queries: PositiveQueries,
        batch_img_metas: list[dict],
        prefix: str,
    ) -> dict[str, Tensor]:
        """Losses of every decoder layer's predictions for one head's positive queries.

        Keys follow DINO's: ``{prefix}.loss_cls`` for the last layer and ``{prefix}.d{i}.loss_cls``
        for the earlier ones (likewise ``loss_bbox`` and ``loss_iou``).
        """
        all_cls, all_boxes = self(hidden_states, list(references))
        losses: dict[str, Tensor] = {}
        num_layers = all_cls.shape[0]
        for lid in range(num_layers):
            cls_l, box_l, iou_l = self._fixed_target_loss(all_cls[lid], all_boxes[lid], queries, batch_img_metas)
            tag = prefix if lid == num_layers - 1 else f"{prefix}.d{lid}"
            losses[f"{tag}.loss_cls"] = cls_l
            losses[f"{tag}.loss_bbox"] = box_l
            losses[f"{tag}.loss_iou"] = iou_l
        return losses

    def _fixed_target_loss(
        self, cls_scores: Tensor, bbox_preds: Tensor, q: PositiveQueries, batch_img_metas: list[dict]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Classification, L1 and IoU losses of one layer, normalised like DETR's matched loss."""
        bs, nq = cls_scores.shape[:2]
        labels = q.labels.reshape(bs * nq)
        label_weights = q.label_weights.reshape(bs * nq)
        targets = q.targets.reshape(bs * nq, 4)
        bbox_weights = q.bbox_weights.reshape(bs * nq, 4)
        preds = bbox_preds.reshape(bs * nq, 4)
        cls_flat = cls_scores.reshape(bs * nq, self.cls_out_channels)

        pos = (labels >= 0) & (labels < self.num_classes)
        num_pos = int(pos.sum())
        # DETR weighs background by bg_cls_weight in the normaliser (0 for sigmoid losses).
        cls_avg = max(num_pos + (bs * nq - num_pos) * self.bg_cls_weight, 1.0)
        if isinstance(self.loss_cls, QualityFocalLoss):
            # Quality targets: IoU of the (detached) prediction with its target on positives.
            quality = label_weights.new_zeros(labels.shape)
            if num_pos:
                quality[pos] = bbox_overlaps(
                    bbox_cxcywh_to_xyxy(preds[pos].detach()), bbox_cxcywh_to_xyxy(targets[pos]), is_aligned=True
                )
            loss_cls = self.loss_cls(cls_flat, (labels, quality), label_weights, avg_factor=cls_avg)
        else:
            loss_cls = self.loss_cls(cls_flat, labels, label_weights, avg_factor=cls_avg)

        # The IoU loss works in pixels, so scale normalised boxes back by each image's size.
        factors = torch.cat(
            [preds.new_tensor([m["img_shape"][1], m["img_shape"][0]] * 2).expand(nq, 4) for m in batch_img_metas]
        )
        box_avg = max(float(num_pos), 1.0)
        loss_iou = self.loss_iou(
            bbox_cxcywh_to_xyxy(preds) * factors,
            bbox_cxcywh_to_xyxy(targets) * factors,
            bbox_weights,
            avg_factor=box_avg,
        )
        loss_bbox = self.loss_bbox(preds, targets, bbox_weights, avg_factor=box_avg)
        return loss_cls, loss_bbox, loss_iou
