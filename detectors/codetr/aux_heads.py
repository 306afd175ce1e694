"""Auxiliary one-to-many heads of Co-DETR that also report which boxes they took as positives.

Both heads are mmdet 3.3.0's own (``ATSSHead``, ``StandardRoIHead``) with their losses untouched;
each subclass only records the assignment its loss already computes, so the detector can turn the
positive anchors (ATSS) or positive proposals (Faster R-CNN) into customised positive queries
without assigning twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mmdet.models.dense_heads import ATSSHead
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from mmdet.utils import InstanceList
from torch import Tensor


@dataclass
class Assignment:
    """One auxiliary head's per-image assignment, in input pixels (x1, y1, x2, y2).

    ``priors[i]`` are the anchors or proposals of image ``i``, ``labels[i]`` their class
    (``num_classes`` = background) and ``targets[i]`` the ground-truth box of each positive
    (anything for negatives).
    """

    priors: list[Tensor]
    labels: list[Tensor]
    targets: list[Tensor]


@MODELS.register_module()
class LorisCoATSSHead(ATSSHead):
    """ATSS head whose loss also yields its positive anchors."""

    _assignment: Assignment | None = None

    def get_targets(self, *args, **kwargs):
        """mmdet's ATSS targets, kept for :meth:`loss_with_assignment` (levels stacked per image)."""
        out = super().get_targets(*args, **kwargs)
        anchors, labels, _, bbox_targets = out[:4]
        # Targets come per level as [bs, n_level, ...]; join levels so each image is one list.
        self._assignment = Assignment(
            priors=list(torch.cat(anchors, 1).unbind(0)),
            labels=list(torch.cat(labels, 1).unbind(0)),
            # reg_decoded_bbox=True (ATSS's default) makes these plain gt boxes, not deltas.
            targets=list(torch.cat(bbox_targets, 1).unbind(0)),
        )
        return out

    def loss_with_assignment(
        self, x: tuple[Tensor, ...], batch_data_samples: SampleList
    ) -> tuple[dict[str, Tensor], Assignment]:
        """ATSS losses (``loss_cls``/``loss_bbox``/``loss_centerness``, per level) and its assignment."""
        if not self.reg_decoded_bbox:
            raise ValueError("LorisCoATSSHead needs reg_decoded_bbox=True so its targets are boxes")
        self._assignment = None
        losses = self.loss(x, batch_data_samples)
        assignment, self._assignment = self._assignment, None
        if assignment is None:
            raise RuntimeError("ATSS loss did not compute its targets")
        return losses, assignment


@MODELS.register_module()
class LorisCoRoIHead(StandardRoIHead):
    """Faster R-CNN RoI head whose loss also yields its sampled proposals and their labels."""

    _sampling_results: list | None = None

    def bbox_loss(self, x: tuple[Tensor, ...], sampling_results: list) -> dict:
        """mmdet's box loss; the sampling results are kept for :meth:`loss_with_assignment`."""
        self._sampling_results = sampling_results
        return super().bbox_loss(x, sampling_results)

    def loss_with_assignment(
        self, x: tuple[Tensor, ...], rpn_results_list: InstanceList, batch_data_samples: SampleList
    ) -> tuple[dict[str, Tensor], Assignment]:
        """RoI losses (``loss_cls``, ``loss_bbox``, ``acc``) and the sampled proposals' assignment."""
        self._sampling_results = None
        losses = self.loss(x, rpn_results_list, batch_data_samples)
        results, self._sampling_results = self._sampling_results, None
        if results is None:
            raise RuntimeError("RoI loss did not sample proposals")
        num_classes = self.bbox_head.num_classes
        priors, labels, targets = [], [], []
        for res in results:
            n_neg = res.neg_priors.shape[0]
            # SamplingResult orders positives first, then negatives.
            priors.append(res.priors)
            labels.append(torch.cat([res.pos_gt_labels, res.pos_gt_labels.new_full((n_neg,), num_classes)]))
            targets.append(torch.cat([res.pos_gt_bboxes, res.pos_gt_bboxes.new_zeros((n_neg, 4))]))
        return losses, Assignment(priors, labels, targets)
