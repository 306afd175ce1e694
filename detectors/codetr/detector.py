"""LoRIS interface to Co-DINO: ``build_detector("codetr", **config)`` -> fit / predict / save / load.

The mmdet modules are imported lazily (on first build), so importing :mod:`detectors` stays cheap
and does not need mmcv until a Co-DETR model is actually made.

Data path: pipeline arrays ``[N, S, S]`` in [0, 1] are resized to the config's ``image_size``,
normalised to roughly zero mean and unit spread, and given to the model as one-channel tensors
with ``DetDataSample`` metadata; predicted boxes are scaled back to the caller's ``S``.
Checkpoints are plain state dicts (``torch.save``) read with ``torch.load(weights_only=True)``,
with the constructor arguments beside them as JSON, so loading never unpickles objects.

Under ``torchrun`` (see :mod:`runtime.distributed`) :meth:`CoDetrDetector.fit` trains with
``DistributedDataParallel``: ``batch_size`` stays the global batch, every rank draws the same
permutation and augmentation and trains on its strided share of each batch, mmdet's losses
average their box counts over ranks, validation IoU is all-reduced, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F

from detectors.base import Detections, Detector, register
from runtime.device import resolve_device
from runtime.distributed import all_reduce_mean, is_distributed, is_main, shard, sync_buffers, world_size, wrap
from runtime.io import atomic_write, atomic_write_text, load_meta, load_weights
from runtime.training import Budget, EarlyStopping, seeded_global_rng, streams, summary_value, training_scope
from scans.records import ScanArrays

# Defaults for the training block of the config; the config file overrides any of them.
DEFAULT_TRAIN: dict[str, Any] = dict(
    epochs=60,  # the training budget: passes over the training scans
    batch_size=8,
    lr=4e-4,  # AdamW
    weight_decay=1e-4,
    backbone_lr_mult=1.0,  # 1.0 because the backbone trains from scratch (0.1 is for pretrained)
    warmup_iters=50,  # linear warm-up before the cosine decay
    min_lr_ratio=0.01,  # cosine floor as a fraction of lr
    clip_grad=0.1,  # DINO's max gradient norm
    seed=0,
    num_threads=None,  # torch intra-op threads; None leaves torch's default
    # opt-in wall-clock cap, off by default; when it binds the cosine follows the clock and the model
    # depends on the machine's speed
    max_minutes=None,
    val_interval=5,  # epochs between validation passes (top-1 IoU on val)
    hflip=True,  # left/right knees mirror each other, so a flip is a plausible scan
    intensity_jitter=0.1,  # +-10 % gain and offset: probe gain varies between scans
    scale_jitter=0.0,  # zoom by a factor in [1 - j, 1 + j] about the image centre (recess size varies)
    translate=0.0,  # shift by up to this fraction of the side in x and y (probe position varies)
    log_interval=10,  # iterations between log lines
)

_PIXEL_MEAN, _PIXEL_STD = 0.5, 0.25  # [0, 1] grayscale -> about [-2, 2]

DEFAULT_CONFIG_FILE = Path(str(resources.files("loris_configs"))) / "detectors" / "codetr.py"
# Top-level names a codetr config file may define (besides "_" helpers).
_CONFIG_KEYS = {"model", "image_size", "aux_heads", "train", "max_detections", "device"}


def load_config(path: str | Path) -> dict[str, Any]:
    """Keyword arguments for :class:`CoDetrDetector` from an mmengine-style python config.

    Names starting with ``_`` are the config's helper constants and are left out.
    """
    from mmengine.config import Config

    cfg = Config.fromfile(str(path)).to_dict()
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _plain(obj: Any) -> Any:
    """Config values as JSON-safe builtins (tuples become lists; mmengine ConfigDicts become dicts)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@contextmanager
def _quiet_mmengine() -> Iterator[None]:
    """Silence mmengine's per-parameter init log lines (and other INFO noise) inside the block."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def _total_loss(losses: dict[str, Any]) -> torch.Tensor:
    """The sum of every ``loss*`` entry (tensors, or lists of per-layer tensors)."""
    parts = [v.sum() if torch.is_tensor(v) else sum(t.sum() for t in v) for k, v in losses.items() if "loss" in k]
    return sum(parts, torch.zeros(()))


def _lr_factor(cfg: dict[str, Any], it: int, total: int, time_fraction: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over whichever budget runs out first
    (steps, or the share of ``max_minutes`` used), so a slow machine still anneals inside the cap."""
    warmup = int(cfg["warmup_iters"])
    if it < warmup:
        return (it + 1) / warmup
    t = min(max((it - warmup) / max(1, total - warmup), time_fraction, 0.0), 1.0)
    return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t))


def _log(log: IO[str], rec: dict[str, Any]) -> None:
    log.write(json.dumps(rec) + "\n")
    log.flush()


@dataclass
class _Best:
    """The best validation so far, its weights, and every validation record."""

    stopper: EarlyStopping = field(default_factory=lambda: EarlyStopping(patience=None, mode="max"))
    state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    last_epoch: int = -1  # the epoch of the latest validation


def build_model(model_cfg: dict[str, Any], aux_heads: bool = True) -> torch.nn.Module:
    """Build and initialise the mmdet model; ``aux_heads=False`` drops RPN/RoI/ATSS (plain DINO)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import ConfigDict

    import detectors.codetr.modules  # noqa: F401  (registers the Loris* modules)
    from detectors.codetr import fast_attention
    from detectors.codetr.native_ops import use_native_ops

    use_native_ops()  # our mmcv has no CUDA kernels (FORCE_CUDA=0): route its ops to torch-native code
    fast_attention.install()  # CPU inference only: mmcv's deformable attention, reordered for speed

    register_all_modules(init_default_scope=True)
    cfg = copy.deepcopy(_plain(model_cfg))
    if not aux_heads:
        for key in ("rpn_head", "rpn_proposal", "roi_head", "atss_head"):
            cfg.pop(key, None)
    # mmdet heads read their train/test settings by attribute (cfg.assigner), as from a ConfigDict.
    cfg = ConfigDict(cfg)
    with _quiet_mmengine():
        model = MODELS.build(cfg)
        model.init_weights()
    return model


def _random_affine(
    x: torch.Tensor, boxes: torch.Tensor, scale_jitter: float, translate: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom and shift each image ``[N, C, S, S]`` and its box ``[N, 4]`` (pixels) alike.

    A pixel at ``p`` moves to ``(p - c) * z + c + t`` (centre ``c``); uncovered borders take the
    edge value (``border`` padding: ultrasound has no black frame to teach). Boxes are clipped
    to the image. DETR-style models trained on ~200 scans overfit without geometric jitter.
    """
    n, _, h, w = x.shape
    z = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale_jitter
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * translate  # fraction of the side
    # affine_grid maps output coords to input coords in [-1, 1]: in = (out - 2t) / z
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / z
    theta[:, :, 2] = -2 * t / z[:, None]
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    c = torch.tensor([w / 2, h / 2, w / 2, h / 2])
    shift = torch.stack([t[:, 0] * w, t[:, 1] * h, t[:, 0] * w, t[:, 1] * h], 1)
    b = (boxes.cpu() - c) * z[:, None] + c + shift
    b[:, [0, 2]] = b[:, [0, 2]].clamp(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clamp(0, h)
    return x, b.to(boxes)


@register("codetr", display="Co-DETR", paper_row="codetr")
class CoDetrDetector(Detector):
    """Co-DINO (Co-DETR with a DINO query head) trained from scratch on one class, the recess.

    Args:
        model: mmdet model config (``type='LorisCoDINO'``), see ``configs/detectors/codetr.py``.
        image_size: square side the model sees; inputs of other sizes are resized.
        aux_heads: False trains plain DINO with the same budget (the ablation).
        train: overrides of :data:`DEFAULT_TRAIN`.
        max_detections: boxes returned per image (at most the number of queries).
        device: torch device for training and inference; ``"auto"`` takes CUDA when present.
        seed: overrides ``train["seed"]`` (the pipeline passes its global seed).
        config_file: python config whose keys fill every argument not given explicitly; when
            neither it nor ``model`` is given, ``configs/detectors/codetr.py`` is used.
    """

    distributed_fit = True

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        image_size: int | None = None,
        aux_heads: bool | None = None,
        train: dict[str, Any] | None = None,
        max_detections: int | None = None,
        device: str | None = None,
        seed: int | None = None,
        config_file: str | Path | None = None,
        **helpers: Any,
    ) -> None:
        unknown = [k for k in helpers if not k.startswith("_")]
        if unknown:
            raise TypeError(f"unknown codetr config keys: {unknown}")
        # The pipeline passes (config_file, seed, device); tests and scripts may pass the config's
        # keys directly. Explicit arguments win over the file.
        file_cfg: dict[str, Any] = {}
        if config_file is not None or model is None:
            file_cfg = load_config(config_file or DEFAULT_CONFIG_FILE)
            bad = sorted(set(file_cfg) - _CONFIG_KEYS)
            if bad:
                raise TypeError(f"unknown keys in {config_file or DEFAULT_CONFIG_FILE}: {bad}")

        def pick(value: Any, name: str, default: Any) -> Any:
            return value if value is not None else file_cfg.get(name, default)

        self.model_cfg = _plain(pick(model, "model", None))
        self.image_size = int(pick(image_size, "image_size", 128))
        self.aux_heads = bool(pick(aux_heads, "aux_heads", True))
        self.train_cfg = {**DEFAULT_TRAIN, **_plain(file_cfg.get("train", {})), **_plain(train or {})}
        unknown_train = sorted(set(self.train_cfg) - set(DEFAULT_TRAIN))
        if unknown_train:
            raise TypeError(f"unknown codetr train keys: {unknown_train}")
        if seed is not None:
            self.train_cfg["seed"] = int(seed)
        self.max_detections = int(pick(max_detections, "max_detections", 10))
        self.model_cfg.setdefault("test_cfg", {})["max_per_img"] = self.max_detections
        self.device = str(pick(device, "device", "cpu"))
        seed = self.train_cfg["seed"]
        # The seed fixes the initial weights too (a config + seed gives one model), without
        # reseeding the caller's global RNG.
        with seeded_global_rng(int(seed)) if seed is not None else contextlib.nullcontext():
            net = build_model(self.model_cfg, self.aux_heads)
        self.model: Any = net.to(torch.device(resolve_device(self.device)))  # mmdet's model: loss(), predict()

    # ------------------------------------------------------------------ data
    def _inputs(self, images: np.ndarray) -> torch.Tensor:
        """``[N, S, S]`` in [0, 1] -> normalised ``[N, 1, s, s]`` at the model size, on the model's device."""
        device = next(self.model.parameters()).device
        x = torch.as_tensor(np.asarray(images, dtype=np.float32), device=device)[:, None]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - _PIXEL_MEAN) / _PIXEL_STD

    def _samples(self, boxes: torch.Tensor | None, n: int) -> list:
        """``DetDataSample``s for a batch; ``boxes`` ``[n, 4]`` in model pixels (one recess each)."""
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        s = self.image_size
        meta = dict(
            img_shape=(s, s), ori_shape=(s, s), pad_shape=(s, s), batch_input_shape=(s, s), scale_factor=(1.0, 1.0)
        )
        out = []
        for i in range(n):
            d = DetDataSample(metainfo=dict(meta))
            if boxes is not None:
                gt = InstanceData()
                gt.bboxes = boxes[i : i + 1]
                gt.labels = torch.zeros(1, dtype=torch.long, device=boxes.device)
                d.gt_instances = gt
            out.append(d)
        return out

    def _augment(self, x: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random horizontal flip and intensity gain/offset (geometry-preserving apart from the flip)."""
        cfg = self.train_cfg
        n = x.shape[0]
        if cfg["hflip"]:
            flip = torch.rand(n, generator=gen) < 0.5
            if flip.any():
                idx = flip.nonzero().squeeze(1).to(x.device)
                x = x.clone()
                x[idx] = x[idx].flip(-1)
                boxes = boxes.clone()
                b = boxes[idx]
                boxes[idx] = torch.stack([self.image_size - b[:, 2], b[:, 1], self.image_size - b[:, 0], b[:, 3]], 1)
        sj, tj = float(cfg["scale_jitter"]), float(cfg["translate"])
        if sj > 0 or tj > 0:
            x, boxes = _random_affine(x, boxes, sj, tj, gen)
        j = float(cfg["intensity_jitter"])
        if j > 0:
            gain = (1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * j).to(x.device)
            offset = ((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * j / _PIXEL_STD).to(x.device)
            x = x * gain + offset
        return x, boxes

    # ------------------------------------------------------------------ training
    def fit(self, train: ScanArrays, val: ScanArrays, workdir: Path) -> dict[str, Any]:
        """Train from scratch with AdamW + warm-up + cosine; keep the weights with the best val IoU.

        The run trains for ``epochs`` (a fixed number of steps, so the same config and seed give
        the same model on any machine). ``max_minutes`` is an opt-in safety valve, off by default:
        when set, the cosine schedule also follows the clock and the run stops at whichever budget
        ends first, so a capped run is still annealed but depends on the machine's speed (the
        summary records it as ``stopped_early``). ``num_threads`` and the seeded global RNG apply to
        this training only: the caller's settings are restored afterwards.
        """
        cfg = self.train_cfg
        with training_scope(int(cfg["seed"]), cfg["num_threads"], self._device()):
            return self._fit(train, val, Path(workdir))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW with the backbone's learning rate scaled by ``backbone_lr_mult`` (group 0; the rest is group 1)."""
        cfg = self.train_cfg
        named = [(nm, p) for nm, p in self.model.named_parameters() if p.requires_grad]
        backbone = [p for nm, p in named if nm.startswith("backbone.")]
        others = [p for nm, p in named if not nm.startswith("backbone.")]
        groups = [dict(params=backbone, lr=cfg["lr"] * cfg["backbone_lr_mult"]), dict(params=others, lr=cfg["lr"])]
        return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    def _train_step(
        self, opt: torch.optim.Optimizer, x: torch.Tensor, boxes: torch.Tensor, net: torch.nn.Module | None = None
    ) -> float:
        """One optimisation step on an augmented batch; returns its total loss.

        ``net`` is the model's ``DistributedDataParallel`` wrapper when distributed: the step goes
        through its ``forward`` (mmdet's ``mode="loss"``), which averages the gradients over ranks.
        """
        samples = self._samples(boxes, x.shape[0])
        losses = net(x, samples, mode="loss") if net is not None and is_distributed() else self.model.loss(x, samples)
        total = _total_loss(losses)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if self.train_cfg["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.train_cfg["clip_grad"]))
        opt.step()
        return float(total.detach())

    def _training_tensors(self, train: ScanArrays, keep: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs ``[n, 1, s, s]`` and boxes ``[n, 4]`` (model pixels) of the scans in ``keep``."""
        if not keep.any():
            raise ValueError("no training scan has a box")
        x_all = self._inputs(train.images[keep])
        scale = self.image_size / float(train.images.shape[-1])
        return x_all, torch.as_tensor(train.boxes[keep] * scale, dtype=torch.float32).to(x_all.device)

    def _fit(self, train: ScanArrays, val: ScanArrays, workdir: Path) -> dict[str, Any]:
        cfg = self.train_cfg
        workdir.mkdir(parents=True, exist_ok=True)
        keep = ~np.isnan(train.boxes).any(axis=1)
        x_all, boxes_all = self._training_tensors(train, keep)
        n = x_all.shape[0]
        bs = min(int(cfg["batch_size"]), n)  # the global batch; each rank takes its strided share
        if bs < world_size():
            raise ValueError(
                f"batch_size is the global batch: at least one scan for each of the {world_size()} processes"
            )
        per_epoch = max(1, n // bs)  # drop the ragged last batch: fixed step cost
        epochs = int(cfg["epochs"])
        rng = streams(int(cfg["seed"]))
        opt = self._optimizer()
        base_lrs = [g["lr"] for g in opt.param_groups]
        budget = Budget(per_epoch * epochs, cfg["max_minutes"], unit="steps")
        best, order = _Best(), np.arange(n)
        # DDP when distributed; some parameters (e.g. of a branch without positives) get no gradient in a step
        net = wrap(self.model, find_unused_parameters=True)
        with open(workdir / "train_log.jsonl" if is_main() else os.devnull, "w") as log:
            for it in budget.units():
                epoch, b = divmod(it, per_epoch)
                if b == 0:
                    self.model.train()
                    order = rng.numpy.permutation(n)
                idx = torch.as_tensor(order[b * bs : (b + 1) * bs])
                x, boxes = self._augment(x_all[idx], boxes_all[idx], rng.torch)
                if is_distributed():  # every rank augments the whole batch (one stream), then keeps its share
                    mine = shard(torch.arange(len(idx), device=x.device))
                    x, boxes = x[mine], boxes[mine]
                factor = _lr_factor(cfg, it, per_epoch * epochs, budget.fraction_of_time())
                for g, base in zip(opt.param_groups, base_lrs):
                    g["lr"] = base * factor
                loss = self._train_step(opt, x, boxes, net)
                if it % int(cfg["log_interval"]) == 0:
                    loss = all_reduce_mean(loss)
                    lr = opt.param_groups[1]["lr"]
                    _log(log, dict(iter=it, epoch=epoch, loss=loss, lr=lr, seconds=round(budget.spent(), 1)))
                if b == per_epoch - 1 and ((epoch + 1) % int(cfg["val_interval"]) == 0 or epoch == epochs - 1):
                    self._validate(val, epoch, best, log, budget.spent())
            stopped_early = budget.stop_reason == "time"
            last_epoch = (budget.ran - 1) // per_epoch
            if stopped_early and best.last_epoch != last_epoch:  # a run cut short is validated where it stopped
                self._validate(val, last_epoch, best, log, budget.spent())
        sync_buffers(self.model)  # rank 0's BatchNorm statistics: every rank keeps one model
        if best.state is not None:
            self.model.load_state_dict(best.state)
        summary = dict(
            iterations=budget.ran,
            epochs_run=last_epoch + 1,
            train_images=int(n),
            skipped_without_box=int((~keep).sum()),
            seconds=round(budget.elapsed, 1),
            best_val_mean_iou=summary_value(best.stopper, missing=-1.0),
            best_epoch=best.stopper.best_at,
            stopped_early=stopped_early,
            aux_heads=self.aux_heads,
            val_history=best.history,
        )
        if is_main():
            atomic_write_text(workdir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def _validate(self, val: ScanArrays, epoch: int, best: _Best, log: IO[str], seconds: float) -> None:
        """Top-1 IoU on ``val`` after ``epoch``; keeps the weights when it is the best so far."""
        best.last_epoch = epoch
        if not len(val):
            return
        sync_buffers(self.model)  # every rank validates rank 0's model
        miou, hit = self._val_iou(val)
        rec = dict(epoch=epoch, val_mean_iou=miou, val_hit50=hit, seconds=round(seconds, 1))
        best.history.append(rec)
        _log(log, rec)
        if best.stopper.update(miou, at=epoch):
            best.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _val_iou(self, val: ScanArrays) -> tuple[float, float]:
        """Mean top-1 IoU and the fraction with IoU >= 0.5 on validation scans that have a box.

        Distributed (a collective call), each rank scores its strided share and the means are all-reduced.
        """
        from scans.records import box_iou

        keep = ~np.isnan(val.boxes).any(axis=1)
        if not keep.any():
            return 0.0, 0.0
        images, boxes = val.images[keep], val.boxes[keep]
        if is_distributed():
            mine = shard(np.arange(len(images)))
            images, boxes = images[mine], boxes[mine]
        dets = self.predict(images) if len(images) else []
        ious = [box_iou(d.boxes[0], g) if len(d) else 0.0 for d, g in zip(dets, boxes)]
        if not is_distributed():
            return float(np.mean(ious)), float(np.mean(np.asarray(ious) >= 0.5))
        m = len(ious)
        miou = float(np.mean(ious)) if m else 0.0
        hit = float(np.mean(np.asarray(ious) >= 0.5)) if m else 0.0
        return all_reduce_mean(miou, weight=m), all_reduce_mean(hit, weight=m)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 32) -> list[Detections]:
        """Query-head detections per image, boxes in the caller's pixels, best first."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3:
            raise ValueError(f"expected [N, S, S] images, got shape {images.shape}")
        self.model.eval()
        sy = images.shape[1] / self.image_size
        sx = images.shape[2] / self.image_size
        out: list[Detections] = []
        for start in range(0, len(images), batch_size):
            x = self._inputs(images[start : start + batch_size])
            results = self.model.predict(x, self._samples(None, x.shape[0]), rescale=False)
            for r in results:
                p = r.pred_instances
                b = p.bboxes.detach().cpu().numpy().astype(np.float32) * np.array([sx, sy, sx, sy], np.float32)
                b[:, 0::2] = b[:, 0::2].clip(0, images.shape[2])
                b[:, 1::2] = b[:, 1::2].clip(0, images.shape[1])
                out.append(Detections(b[: self.max_detections], p.scores.detach().cpu().numpy()[: self.max_detections]))
        return out

    # ------------------------------------------------------------------ persistence
    def _ctor_args(self) -> dict[str, Any]:
        return dict(
            model=self.model_cfg,
            image_size=self.image_size,
            aux_heads=self.aux_heads,
            train=_plain(self.train_cfg),
            max_detections=self.max_detections,
            device=self.device,
        )

    def save(self, directory: Path) -> None:
        """``config.json`` (constructor arguments) and ``weights.pt`` (a plain state dict)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "config.json", json.dumps(self._ctor_args(), indent=1))
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        atomic_write(directory / "weights.pt", lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, directory: Path) -> CoDetrDetector:
        """Rebuild from :meth:`save`'s files; weights are read with ``weights_only=True``."""
        directory = Path(directory)
        args = load_meta(directory / "config.json")
        det = cls(**args)
        load_weights(det.model, directory / "weights.pt", map_location="cpu")
        det.model.eval()
        return det
