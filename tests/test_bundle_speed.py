"""Bundle.process prepares its U-Net once (BatchNorm folded, channels-last) with the same outputs as
reconstructing from the plain network every batch, and prepares it again when the weights change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from detectors.base import Detections, Detector
from detectors.prior import PriorPolicy
from pipeline.bundle import Bundle, Thresholds, bundle_doc
from pipeline.config import load_config
from reconstruction.deviation import image_score
from reconstruction.infer import reconstruct
from reconstruction.segment import segment
from reconstruction.unet import UNet, UNetConfig

SIZE = 32


class _FixedBoxes(Detector):
    """One box per image, its position depending on the image (so the batch order matters)."""

    name = "fixed-test"
    display_name = "fixed"

    def fit(self, train: Any, val: Any, workdir: Path) -> dict[str, Any]:
        return {}

    def predict(self, images: np.ndarray) -> list[Detections]:
        out = []
        for im in images:
            y = 4 + int(im.mean() * 8)
            out.append(Detections(np.array([[6, y, 24, y + 8]], np.float32), np.array([0.9], np.float32)))
        return out

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path) -> Detector:
        raise NotImplementedError


def _bundle() -> Bundle:
    cfg = load_config(None, "quick", [f"image_size={SIZE}"])
    policy = PriorPolicy(0.05, (4.0, 8.0, 28.0, 16.0))
    doc = bundle_doc(cfg, policy, Thresholds(0.1, {}, 0.05, 0.0))
    torch.manual_seed(0)
    net = UNet(UNetConfig.profile("tiny"))
    for m in net.modules():  # running statistics away from the identity, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return Bundle(doc, _FixedBoxes(), net.eval(), "cpu")


def _expected(b: Bundle, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, heat and masks as Bundle.process computed them before it kept a prepared U-Net."""
    d = b.doc
    boxes = np.stack([det.boxes[0] for det in b.detector.predict(images)])
    rec = reconstruct(b.unet, images, boxes, maps=tuple(d["maps"]), device="cpu", margin=float(d["mask_margin"]))
    s, g = d["score"], d["segmentation"]
    scores = image_score(
        rec.maps[s["map"]],
        boxes,
        pooling=s["pooling"],
        region=s["region"],
        topk_fraction=s["topk_fraction"],
        margin=float(d["mask_margin"]),
    )
    heat = rec.maps[g["map"]]
    return scores, heat, segment(heat, float(g["threshold"]), kernel=int(g["kernel"]))


def test_process_matches_the_unprepared_path_and_follows_weight_changes() -> None:
    b = _bundle()
    images = np.random.default_rng(0).random((5, SIZE, SIZE), dtype=np.float32)
    for _ in range(2):  # the first call prepares the U-Net, the second reuses it
        out = b.process(images)
        scores, heat, masks = _expected(b, images)
        # the prepared copy is the one reconstruct() makes on every call, so the numbers are the same
        np.testing.assert_array_equal(out.scores, scores)
        np.testing.assert_array_equal(out.heat, heat)
        np.testing.assert_array_equal(out.masks, masks)
    prepared = b._inference_unet()
    assert b._inference_unet() is prepared
    with torch.no_grad():
        b.unet.head.weight.mul_(-1)  # an in-place update must be seen
    assert b._inference_unet() is not prepared
    out = b.process(images)
    scores, heat, _ = _expected(b, images)
    np.testing.assert_array_equal(out.scores, scores)
    np.testing.assert_array_equal(out.heat, heat)
