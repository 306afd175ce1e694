"""The supervised multi-task baseline of Table 1 (Colussi et al. 2023, ref [3]): classification + box regression.

An EfficientNet-Lite0 (ImageNet weights from :mod:`reconstruction.peers.backbones`, fine-tuned) feeds two
heads on its pooled features: a distended/normal logit and the recess box ``(x1, y1, x2, y2)`` as fractions
of the image side. Trained on both classes of the training part with class-balanced BCE plus smooth-L1 on
the boxes that are present; the score is the distended probability. Image level only, as in the paper
(see ``docs/design.md``).

>>> from reconstruction.peers.base import PEERS
>>> PEERS["multitask"].supervised, PEERS["multitask"].gives_maps
(True, False)
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from reconstruction.peers.backbones import BACKBONE, Lite0Peer
from reconstruction.peers.base import Budget, fit_steps, gray3, register_peer, resize_images, to_batch
from scans.records import DISTENDED, NORMAL, ScanArrays


class MultiTaskNet(nn.Module):
    """Backbone + global pooling + a classification logit and a sigmoid box head."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = timm.create_model(BACKBONE, pretrained=False, num_classes=0)
        feat = int(cast(Any, self.backbone).num_features)
        self.dropout = nn.Dropout(dropout)
        self.cls = nn.Linear(feat, 1)
        self.box = nn.Linear(feat, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.dropout(self.backbone(x))
        return self.cls(f).squeeze(1), torch.sigmoid(self.box(f))


@register_peer(
    "multitask", display="Multi-task", source="own implementation", pretrained=True, reference="Colussi et al. 2023 [3]"
)
class MultiTaskPeer(Lite0Peer):
    """Supervised classifier with a box-regression head; scores only (it cannot give maps)."""

    supervised = True
    gives_maps = False
    defaults = {"lr": 1e-4, "box_weight": 1.0, "dropout": 0.2, "pretrained": True}
    budgets = {
        "quick": Budget(epochs=2, batch_size=8),
        "default": Budget(epochs=30, batch_size=16, work_size=128),
        "paper": Budget(epochs=100, batch_size=32),
    }

    def _build(self, size: int) -> nn.Module:
        return MultiTaskNet(float(self.options["dropout"]))

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        net = self.net
        assert isinstance(net, MultiTaskNet)
        labels = np.asarray(train.labels)
        n_pos, n_neg = int((labels == DISTENDED).sum()), int((labels == NORMAL).sum())
        if n_pos == 0 or n_neg == 0 or n_pos + n_neg != len(labels):
            raise ValueError("multitask is supervised: train on labelled scans of both classes (0 and 1)")
        self._load_imagenet([net.backbone])
        images = np.asarray(train.images, np.float32)
        size = images.shape[-1]
        boxes = np.asarray(train.boxes, np.float32).reshape(-1, 4) / size
        pos_weight = torch.tensor(n_neg / n_pos, device=self.device)
        opt = torch.optim.Adam(net.parameters(), lr=float(self.options["lr"]))

        def loss_of(idx: np.ndarray) -> Tensor:
            y = torch.from_numpy(labels[idx].astype(np.float32)).to(self.device)
            b = torch.from_numpy(boxes[idx]).to(self.device)
            logit, box = net(gray3(to_batch(images, idx, self.device)))
            loss = F.binary_cross_entropy_with_logits(logit, y, pos_weight=pos_weight)
            has_box = ~torch.isnan(b).any(dim=1)
            if bool(has_box.any()):
                loss = loss + float(self.options["box_weight"]) * F.smooth_l1_loss(box[has_box], b[has_box], beta=0.05)
            return loss

        rec = fit_steps(net, opt, len(images), budget, rng, loss_of)
        return {**rec, "n_distended": n_pos, "n_normal": n_neg}

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        logit, _ = self.net(gray3(x))  # type: ignore[misc]
        return torch.sigmoid(logit), None

    def predict_boxes(self, images: np.ndarray) -> np.ndarray:
        """The box head's ``[N, 4]`` boxes in pixels of the input images."""
        if self.net is None or self.image_size is None:
            raise RuntimeError("multitask: fit or load the peer before predict_boxes")
        out = []
        self.net.eval()
        with torch.inference_mode():
            for s in range(0, len(images), 16):
                x = resize_images(self._tensor(images[s : s + 16]), int(self.work_size or self.image_size))
                out.append(self.net(gray3(x.to(self.device)))[1].cpu().numpy())
        return np.concatenate(out) * self.image_size
