"""Box refinement: a second, close look that re-places the four edges of a detector's box.

Why it exists: detectors find the recess but put its ends and walls a few pixels off, although
the ends are plainly visible; refinement lifts mAP@75 (figures in docs/results.md). A small CNN
looks at a crop around the box at the crop's own resolution and localises each edge as a 1-D
soft-argmax: left and right along the crop's width, top and bottom along its height. It is the
detector-agnostic counterpart of Cascade R-CNN's later stages, trained on the same scans as the
detector (normal only by default) from jittered ground-truth boxes, so it never sees a distended
recess either.

Under ``torchrun`` (see :mod:`runtime.distributed`) :meth:`BoxRefiner.fit` trains with
``DistributedDataParallel``: ``batch_size`` stays the global batch, every rank draws the same
batch and augmentation from the one seed and crops its strided share of it.

>>> import numpy as np
>>> ref = BoxRefiner(steps=2, batch_size=2, seed=0)
>>> imgs = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
>>> boxes = np.tile(np.array([[10, 20, 50, 35]], np.float32), (4, 1))
>>> ref.refine(imgs[:1], boxes[:1]).shape  # untrained; ref.fit(imgs, boxes, imgs, boxes) trains it (in the tests)
(1, 4)
"""

from __future__ import annotations

import copy
import json
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import nms, roi_align

from detectors.base import Detections, Detector, check_inference_settings, detector_class
from runtime.device import resolve_device
from runtime.distributed import all_reduce_mean, is_distributed, loss_scale, shard, sync_buffers, world_size, wrap
from runtime.io import atomic_write, atomic_write_text, load_meta, load_weights
from runtime.training import Budget, seeded_global_rng, streams
from scans.records import ScanArrays


def context_regions(boxes: torch.Tensor, pad_x: float, pad_y: float) -> torch.Tensor:
    """The crop each box is refined in: the box grown by ``pad_x`` of its width on each side and
    ``pad_y`` of its height above and below (it must hold the true edges the box missed)."""
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    return torch.stack(
        [boxes[:, 0] - pad_x * w, boxes[:, 1] - pad_y * h, boxes[:, 2] + pad_x * w, boxes[:, 3] + pad_y * h], 1
    )


class _Block(nn.Module):
    """Residual 3x3 block; dilation widens the context without losing resolution."""

    def __init__(self, ch: int, dilation: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.b1 = nn.BatchNorm2d(ch)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class EdgeNet(nn.Module):
    """Crop ``[B, 1, H, W]`` -> edge positions ``[B, 4]`` (x1, y1, x2, y2) in crop units [0, 1].

    Each edge has a logit map; it is pooled (log-sum-exp, a soft maximum) across the other axis
    into a 1-D profile whose soft-argmax is the edge. Soft-argmax keeps sub-cell precision and
    the output bounded to the crop.
    """

    def __init__(self, width: int = 24, dilations: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.body = nn.Sequential(*[_Block(width, d) for d in dilations])
        self.head = nn.Conv2d(width, 4, 1)  # left, top, right, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.body(self.stem(x)))  # [B, 4, h, w]
        h, w = logits.shape[-2:]
        px = torch.logsumexp(logits[:, [0, 2]], dim=2)  # [B, 2, w] profiles along x
        py = torch.logsumexp(logits[:, [1, 3]], dim=3)  # [B, 2, h] profiles along y
        gx = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
        gy = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
        ex = (px.softmax(-1) * gx).sum(-1)
        ey = (py.softmax(-1) * gy).sum(-1)
        return torch.stack([ex[:, 0], ey[:, 0], ex[:, 1], ey[:, 1]], 1)


def fold_edgenet(net: EdgeNet) -> EdgeNet:
    """An eval-mode copy of ``net`` with every BatchNorm folded into the conv before it, in channels-last
    layout: the same edges to float32 rounding, in less time.

    >>> net = EdgeNet(8).eval()
    >>> x = torch.rand(2, 1, 16, 32)
    >>> bool(torch.allclose(fold_edgenet(net)(x), net(x), atol=1e-5))
    True
    """
    m = copy.deepcopy(net).eval()
    pairs = [(m.stem, "0", "1"), (m.stem, "3", "4")] + [
        (b, c, n) for b in m.body for c, n in (("c1", "b1"), ("c2", "b2"))
    ]
    with torch.no_grad():
        for owner, c, n in pairs:
            conv, norm = getattr(owner, c), getattr(owner, n)
            assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
            setattr(owner, c, fuse_conv_bn_eval(conv, norm))
            setattr(owner, n, nn.Identity())
    return m.to(memory_format=torch.channels_last)


_FOLD_LOCK = threading.Lock()  # a bundle refines the parts of a batch from several threads at once


@dataclass
class RefinerConfig:
    """Settings of :class:`BoxRefiner` (the defaults are the CPU default, chosen on the phantom)."""

    crop_h: int = 32  # crop grid rows (the padded box is ~50 px tall at 128 px)
    crop_w: int = 96  # crop grid columns (the padded box is ~105 px wide at 128 px)
    pad_x: float = 0.3  # context each side, fraction of box width (must hold the detectors' x errors)
    pad_y: float = 0.6  # context above/below, fraction of box height (distended boxes are taller)
    jitter_x: float = 0.12  # training box noise: mean std of each x edge, fraction of width
    jitter_y: float = 0.15  # ... of each y edge, fraction of height (per sample 0-2x the mean)
    width: int = 24  # CNN channels
    steps: int = 500  # the training budget in optimisation steps (about a minute per fold on 2 CPU cores)
    batch_size: int = 32
    lr: float = 2e-3  # AdamW with cosine decay
    # Opt-in wall-clock cap on training, 0 = off (the default); a cap that binds makes the refiner
    # depend on the machine's speed.
    max_minutes: float = 0.0
    iterations: int = 2  # refinement passes at inference (the second starts from a closer box)
    # Candidates the refiner moved onto the same edges are one box: drop the lower-scored copies
    # (IoU >= this after refinement; None keeps all). Co-DETR has no NMS, so its near-duplicates
    # would otherwise rank above true boxes.
    dedup_iou: float | None = 0.9
    # Also refine the mirrored crop and average the two (chosen on validation scans).
    tta_flip: bool = True
    seed: int = 0


class BoxRefiner:
    """Train on (image, ground-truth box) pairs, then move any detector's boxes onto the edges."""

    INFERENCE_KEYS = frozenset(
        {"iterations", "dedup_iou", "tta_flip"}
    )  # settings that do not change the trained weights

    def __init__(self, device: str = "cpu", **config: Any) -> None:
        unknown = sorted(set(config) - set(RefinerConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown box-refiner setting(s) {unknown}; known: {sorted(RefinerConfig.__dataclass_fields__)}"
            )
        self.config = RefinerConfig(**config)
        self.device = device
        # The seed fixes the initial weights without reseeding the caller's global RNG.
        with seeded_global_rng(self.config.seed):
            self.net = EdgeNet(self.config.width)
        self.net.to(device)
        self._folded: tuple[tuple[tuple[int, int, int], ...], EdgeNet] | None = None  # (weights key, copy)

    def inference_net(self) -> EdgeNet:
        """The network as :meth:`refine` runs it (:func:`fold_edgenet`), made again only when ``net`` or one
        of its weights or running statistics changes (any in-place update bumps a tensor's version), so
        training and ``load_state_dict`` are always seen; training itself uses ``net``."""
        net = self.net
        key = tuple((id(t), t.data_ptr(), t._version) for t in [*net.parameters(), *net.buffers()])
        with _FOLD_LOCK:
            if self._folded is None or self._folded[0] != key:
                self._folded = (key, fold_edgenet(net))
            return self._folded[1]

    def set_inference(self, **settings: Any) -> None:
        """Change inference-only settings (:attr:`INFERENCE_KEYS`) of a trained refiner."""
        check_inference_settings(settings, self.INFERENCE_KEYS)
        for k, v in settings.items():
            setattr(self.config, k, v)

    def _crops(self, images: torch.Tensor, idx: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        c = self.config
        rois = torch.cat([idx[:, None].to(regions.dtype), regions], 1)
        # roi_align samples the padded region on a fixed grid; outside the image it reads zeros
        # (the scan's black surround), so boxes at the border need no special case.
        return roi_align(
            images, rois, output_size=(c.crop_h, c.crop_w), spatial_scale=1.0, sampling_ratio=2, aligned=True
        )

    @staticmethod
    def _frame(regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Origin and size of each crop, repeated for (x1, y1, x2, y2): crop units are (box - origin) / size."""
        return regions[:, :2].repeat(1, 2), (regions[:, 2:] - regions[:, :2]).repeat(1, 2)

    @staticmethod
    def _unflip(rel: torch.Tensor) -> torch.Tensor:
        """Edges found on a mirrored crop, in the unmirrored crop's units (left and right swap)."""
        return torch.stack([1 - rel[:, 2], rel[:, 1], 1 - rel[:, 0], rel[:, 3]], 1)

    def _to_crop(self, boxes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        origin, size = self._frame(regions)
        return (boxes - origin) / size

    def _from_crop(self, rel: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        origin, size = self._frame(regions)
        return origin + rel * size

    def _jitter(self, boxes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.config
        w = (boxes[:, 2] - boxes[:, 0])[:, None]
        h = (boxes[:, 3] - boxes[:, 1])[:, None]
        # Per-sample noise level in [0, 1]: the refiner meets both near-perfect and poor boxes.
        level = torch.rand(len(boxes), 1, generator=gen, device=boxes.device)
        nx = torch.randn(len(boxes), 2, generator=gen, device=boxes.device) * c.jitter_x * w * 2 * level
        ny = torch.randn(len(boxes), 2, generator=gen, device=boxes.device) * c.jitter_y * h * 2 * level
        out = boxes + torch.stack([nx[:, 0], ny[:, 0], nx[:, 1], ny[:, 1]], 1)
        return torch.stack(
            [out[:, 0], out[:, 1], torch.maximum(out[:, 2], out[:, 0] + 2), torch.maximum(out[:, 3], out[:, 1] + 2)], 1
        )

    def fit(
        self, images: np.ndarray, boxes: np.ndarray, val_images: np.ndarray, val_boxes: np.ndarray
    ) -> dict[str, Any]:
        """Train on ``[N, S, S]`` images and their ``[N, 4]`` boxes for ``steps`` steps (or until the
        opt-in ``max_minutes``); report validation edge error.

        Augmentation: horizontal mirror (box mirrored with it), gain jitter, and the box noise.
        Distributed, ``batch_size`` is the global batch (see the module's docstring).
        """
        c = self.config
        ok = np.isfinite(boxes).all(1)
        if not ok.any():
            raise ValueError("the box refiner needs training scans with boxes")
        if c.batch_size < world_size():
            raise ValueError(
                f"batch_size is the global batch: at least one crop for each of the {world_size()} processes"
            )
        imgs = torch.from_numpy(np.ascontiguousarray(images[ok], np.float32))[:, None].to(self.device)
        gts = torch.from_numpy(np.asarray(boxes[ok], np.float32)).to(self.device)
        gen = streams(c.seed, self.device).torch
        opt = torch.optim.AdamW(self.net.parameters(), lr=c.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / c.steps, 1.0))))
        net = wrap(self.net)  # DDP when distributed: it copies rank 0's weights to every rank
        self.net.train()
        budget = Budget(c.steps, c.max_minutes, unit="steps")
        losses: list[float] = []
        for _ in budget.units():
            loss, scale = self._train_step(imgs, gts, gen, net)
            opt.zero_grad(set_to_none=True)
            (loss * scale if is_distributed() else loss).backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        sync_buffers(self.net)  # rank 0's BatchNorm statistics: every rank keeps one model
        info = {
            "refiner_steps": len(losses),
            "refiner_seconds": round(budget.elapsed, 1),
            "refiner_final_loss": all_reduce_mean(float(np.mean(losses[-50:]))) if losses else None,
        }
        info.update(self.evaluate(val_images, val_boxes))
        return info

    def _train_step(
        self, imgs: torch.Tensor, gts: torch.Tensor, gen: torch.Generator, net: nn.Module | None = None
    ) -> tuple[torch.Tensor, float]:
        """The mean loss over this rank's share of one augmented batch drawn from ``imgs``
        ``[N, 1, S, S]`` and their boxes ``gts``, through ``net`` (default: the refiner's network),
        and the factor that turns DDP's mean over ranks into the global batch's mean.

        Every rank draws the whole batch and its augmentation from the same stream, then crops its share.
        """
        c, size, n = self.config, imgs.shape[-1], self.config.batch_size
        pick = torch.randint(len(imgs), (n,), generator=gen, device=self.device)
        b = gts[pick].clone()
        flip = torch.rand(n, generator=gen, device=self.device) < 0.5
        b[flip] = torch.stack([size - b[flip, 2], b[flip, 1], size - b[flip, 0], b[flip, 3]], 1)
        gain = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen, device=self.device) - 0.5)
        regions = context_regions(self._jitter(b, gen), c.pad_x, c.pad_y)
        target = self._to_crop(b, regions).clamp(0, 1)
        if is_distributed():
            mine = shard(torch.arange(n, device=self.device))
            pick, flip, gain, regions, target = pick[mine], flip[mine], gain[mine], regions[mine], target[mine]
        x = imgs[pick]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = (x * gain).clamp(0, 1)
        crops = self._crops(x, torch.arange(len(pick), device=self.device), regions)
        out = (net if net is not None else self.net)(crops)
        return F.smooth_l1_loss(out, target, beta=0.02), loss_scale(len(pick), n)

    def evaluate(self, images: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
        """Mean absolute edge error (pixels) of jittered ground-truth boxes before and after refinement."""
        ok = np.isfinite(boxes).all(1)
        if not ok.any():
            return {}
        gts = torch.from_numpy(np.asarray(boxes[ok], np.float32))
        gen = torch.Generator().manual_seed(self.config.seed + 1)
        noisy = self._jitter(gts, gen).numpy()
        fixed = self.refine(images[ok], noisy)
        g = gts.numpy()
        return {
            "val_edge_mae_before": float(np.abs(noisy - g).mean()),
            "val_edge_mae_after": float(np.abs(fixed - g).mean()),
        }

    @torch.no_grad()
    def refine(
        self, images: np.ndarray, boxes: np.ndarray, image_index: np.ndarray | None = None, batch_size: int = 256
    ) -> np.ndarray:
        """Refined ``[K, 4]`` boxes; box k lies on ``images[image_index[k]]`` (default: image k)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return boxes.copy()
        idx = np.arange(len(boxes)) if image_index is None else np.asarray(image_index, np.int64).reshape(-1)
        if len(idx) != len(boxes) or idx.min() < 0 or idx.max() >= len(images):
            raise ValueError(
                f"{len(boxes)} boxes need as many image indices in [0, {len(images)}), got {idx.tolist()[:8]}"
            )
        imgs = torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None].to(self.device)
        size_h, size_w = imgs.shape[-2:]
        self.net.eval()
        net = self.inference_net()
        out = torch.from_numpy(boxes.copy()).to(self.device)
        ti = torch.from_numpy(idx).to(self.device)
        for _ in range(self.config.iterations):
            for s in range(0, len(out), batch_size):
                b = out[s : s + batch_size]
                regions = context_regions(b, self.config.pad_x, self.config.pad_y)
                crops = self._crops(imgs, ti[s : s + batch_size], regions)
                if self.config.tta_flip:  # the crops and their mirrors in one forward pass
                    both = net(torch.cat([crops, crops.flip(-1)]))
                    rel = 0.5 * (both[: len(crops)] + self._unflip(both[len(crops) :]))
                else:
                    rel = net(crops)
                out[s : s + batch_size] = self._from_crop(rel, regions)
        res = out.cpu().numpy()
        # Edges cannot cross: a box keeps at least one pixel each way (and stays in the image).
        res[:, 0] = res[:, 0].clip(0, size_w - 1)
        res[:, 1] = res[:, 1].clip(0, size_h - 1)
        res[:, 2] = np.maximum(res[:, 2], res[:, 0] + 1).clip(None, size_w)
        res[:, 3] = np.maximum(res[:, 3], res[:, 1] + 1).clip(None, size_h)
        return res

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        atomic_write(directory / "refiner.pt", lambda p: torch.save(state, p))
        atomic_write_text(directory / "refiner.json", json.dumps({"refiner": asdict(self.config)}, indent=1))

    @classmethod
    def load(cls, directory: Path, device: str = "cpu") -> BoxRefiner:
        directory = Path(directory)
        meta = load_meta(directory / "refiner.json")
        ref = cls(device=device, **meta["refiner"])
        load_weights(ref.net, directory / "refiner.pt", map_location=device)
        ref.net.eval()
        return ref


class RefinedDetector(Detector):
    """A trained detector whose every box goes through a :class:`BoxRefiner` (scores unchanged),
    then loses the copies that refinement made of a higher-scored box (``dedup_iou``).

    The pipeline trains and caches the two separately (one refiner serves every detector of a
    fold); :meth:`fit` trains both in one call for scripts.
    """

    name = "refined"

    def __init__(self, base: Detector, refiner: BoxRefiner, top_k: int | None = None) -> None:
        """``top_k`` keeps (and refines) only each image's k highest-scored boxes: a deployed
        bundle needs only the prior, the top box, while COCO mAP needs them all (None)."""
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1 or None, got {top_k}")
        self.base, self.refiner, self.top_k = base, refiner, top_k

    def fit(self, train: ScanArrays, val: ScanArrays, workdir: Path) -> dict[str, Any]:
        """Train the base detector, then the refiner on the same scans (the pipeline does the two
        steps itself so that each is cached on its own)."""
        info = self.base.fit(train, val, workdir) or {}
        return {**info, "refiner": self.refiner.fit(train.images, train.boxes, val.images, val.boxes)}

    def predict(self, images: np.ndarray) -> list[Detections]:
        raw = self.base.predict(images)
        if not raw:
            return raw
        if self.top_k is not None:
            # Co-DETR returns every query; refining 30 boxes per scan to use one made the refiner
            # ~60% of a bundle's predict time.
            keep = [np.argsort(-np.asarray(d.scores), kind="stable")[: self.top_k] for d in raw]
            raw = [Detections(d.boxes[k], d.scores[k]) for d, k in zip(raw, keep)]
        index = np.concatenate([np.full(len(d), i) for i, d in enumerate(raw)])
        boxes = self.refiner.refine(images, np.concatenate([d.boxes for d in raw]), index)
        out, k = [], 0
        dedup = self.refiner.config.dedup_iou
        for d in raw:
            b, s = boxes[k : k + len(d)], d.scores
            k += len(d)
            if dedup is not None and len(s) > 1:
                keep = nms(torch.from_numpy(b), torch.from_numpy(s), float(dedup)).numpy()
                b, s = b[keep], s[keep]
            out.append(Detections(b, s))
        return out

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.base.save(directory)
        self.refiner.save(directory / "refiner")
        atomic_write_text(directory / "refined.json", json.dumps({"base": self.base.name}))

    @classmethod
    def load(cls, directory: Path, top_k: int | None = None) -> RefinedDetector:
        directory = Path(directory)
        meta = load_meta(directory / "refined.json")
        base = detector_class(meta["base"]).load(directory)
        return cls(
            base,
            BoxRefiner.load(directory / "refiner", device=resolve_device()),
            top_k=top_k,
        )
