"""Bundle.process prepares its U-Net once (BatchNorm folded, channels-last) with the same outputs as
reconstructing from the plain network every batch, and prepares it again when the weights change; it splits
a batch into parts run at once with the serial path's numbers; the box refiner's folded copy matches its
network and follows weight changes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detectors.base import Detections, Detector
from detectors.prior import PriorPolicy
from detectors.refine import BoxRefiner, context_regions
from pipeline.config import load_config
from pipeline.serve.bundle import Bundle
from pipeline.serve.train import Thresholds, bundle_doc
from reconstruction.deviation import image_score
from reconstruction.infer import reconstruct
from reconstruction.segment import segment
from reconstruction.unet import UNet, UNetConfig
from runtime.device import torch_threads

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
        inset=float(s["inset"]),
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


def _new_thread_count() -> int:
    """The torch thread count a newly started thread gets."""
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    t.start()
    t.join()
    return got[0]


def test_split_batch_equals_the_serial_path_and_leaves_the_thread_setting() -> None:
    b = _bundle()
    images = np.random.default_rng(1).random((7, SIZE, SIZE), dtype=np.float32)
    b.parts = 1
    serial = b.process(images)
    assert b._pool is None  # one part: no worker threads
    with torch_threads(2):
        for parts in (2, 3):
            b.parts = parts
            for _ in range(2):  # the first call starts the workers, the second reuses them
                out = b.process(images)
                # oneDNN may pick another kernel for another batch size: equal to float32 rounding
                np.testing.assert_allclose(out.scores, serial.scores, rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(out.heat, serial.heat, rtol=0, atol=1e-6)
                np.testing.assert_array_equal(out.masks, serial.masks)
                np.testing.assert_allclose(out.boxes, serial.boxes, atol=1e-4)
                np.testing.assert_array_equal(out.confidences, serial.confidences)
                assert out.sources == serial.sources
            assert b._pool is not None and b._pool[0] == parts
            # the workers run on one torch thread each; the caller's and new threads' setting is unchanged
            assert set(b._pool[1].map(lambda _: torch.get_num_threads(), range(4))) == {1}
            assert torch.get_num_threads() == 2 and _new_thread_count() == 2
        b.parts = None  # torch's thread count
        out = b.process(images[:1])  # one image: one part
        np.testing.assert_allclose(out.heat, serial.heat[:1], rtol=0, atol=1e-6)
        assert b._pool is not None and b._pool[0] == 3  # no part, no new pool


def _refine_unfolded(ref: BoxRefiner, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """BoxRefiner.refine through the plain network, crops and mirrors in separate passes."""
    imgs = torch.from_numpy(images)[:, None]
    out = torch.from_numpy(boxes.copy())
    idx = torch.arange(len(boxes))
    ref.net.eval()
    with torch.no_grad():
        for _ in range(ref.config.iterations):
            regions = context_regions(out, ref.config.pad_x, ref.config.pad_y)
            crops = ref._crops(imgs, idx, regions)
            rel = 0.5 * (ref.net(crops) + ref._unflip(ref.net(crops.flip(-1))))
            out = ref._from_crop(rel, regions)
    res = out.numpy()
    size = images.shape[-1]
    res[:, 0], res[:, 1] = res[:, 0].clip(0, size - 1), res[:, 1].clip(0, size - 1)
    res[:, 2] = np.maximum(res[:, 2], res[:, 0] + 1).clip(None, size)
    res[:, 3] = np.maximum(res[:, 3], res[:, 1] + 1).clip(None, size)
    return res


def test_refiner_fast_path_equals_the_plain_network_and_follows_weight_changes() -> None:
    ref = BoxRefiner(seed=0, steps=2, batch_size=2)
    for m in ref.net.modules():  # running statistics away from the identity, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    images = rng.random((4, 64, 64), dtype=np.float32)
    boxes = np.array([[10, 20, 50, 35], [5, 30, 40, 44], [20, 10, 60, 30], [0, 40, 30, 63]], np.float32)
    assert ref.config.tta_flip
    np.testing.assert_allclose(ref.refine(images, boxes), _refine_unfolded(ref, images, boxes), atol=1e-4)
    folded = ref.inference_net()
    assert ref.inference_net() is folded
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        ref.net.head.weight.mul_(-1)  # an in-place update must be seen
    assert ref.inference_net() is not folded
    np.testing.assert_allclose(ref.refine(images, boxes), _refine_unfolded(ref, images, boxes), atol=1e-4)
    keys = list(ref.net.state_dict())
    folded = ref.inference_net()
    ref.fit(images, boxes, images[:1], boxes[:1])  # training runs the plain network and changes the weights
    assert list(ref.net.state_dict()) == keys and ref.inference_net() is not folded
    np.testing.assert_allclose(ref.refine(images, boxes), _refine_unfolded(ref, images, boxes), atol=1e-4)


def test_flop_count_sees_the_split_batch() -> None:
    """bench's FLOP count: process() runs its parts in worker threads the counter cannot see."""
    from pipeline.bench.suite import process_flops

    b = _bundle()
    b.parts = 2
    with torch_threads(2):
        gflop = process_flops(b, n=4)
    assert gflop["unet"] > 0
    assert gflop["total"] >= gflop["unet"]
    assert b.parts == 2
