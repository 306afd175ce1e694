"""Train the inpainting U-Net on non-distended scans (LoRIS single mask, or RIAD multi-masks).

Early stopping watches the mean validation loss over the whole validation set (the authors'
code used the last batch only); the best weights are kept. With a ``workdir`` the run writes
``last.pt`` after every epoch (tensors and plain data only, read back with
``torch.load(weights_only=True)``) and resumes from it, and writes the best model to
``workdir/best`` (see :mod:`reconstruction.checkpoint`).

Under ``torchrun`` (after :func:`runtime.distributed.init_from_env`) the loop trains one model with
``DistributedDataParallel``: ``batch_size`` stays the global batch, each rank takes its strided
share of every global batch of the one shared permutation, validation batches are split between
ranks and their loss all-reduced, rank 0 decides when to stop, and only rank 0 writes. The
result matches one process with the same global batch up to BatchNorm statistics, which each
rank computes on its share (see docs/design.md). Example: tests/reconstruction/test_reconstruction_train.py.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from reconstruction.checkpoint import save_model
from reconstruction.losses import LossWeights, reconstruction_loss
from reconstruction.masking import apply_riad_masks, apply_single_mask, compose_riad, riad_masks
from reconstruction.unet import UNet, UNetConfig
from runtime.device import resolve_device
from runtime.distributed import (
    all_reduce_mean,
    barrier,
    is_distributed,
    is_main,
    loss_scale,
    rank,
    shard,
    sync_buffers,
    world_size,
    wrap,
)
from runtime.io import atomic_write, load_state
from runtime.training import Budget, EarlyStopping, streams, training_scope
from scans.records import DISTENDED, ScanArrays

LAST = "last.pt"
BEST_DIR = "best"
_FORMAT = 1
# settings that may change between a run and its resumption without changing the result's meaning:
# the budget may be extended (more epochs, a cap lifted) and the run goes on from its last epoch;
# a checkpoint already past this run's epoch budget is refused (see _start). Callers that cache
# finished models must key them on these too (the pipeline keys the whole config).
_BUDGET_KEYS = {
    "epochs",
    "patience",
    "max_epochs",
    "max_minutes",
    "max_train_seconds",  # max_minutes' name in older checkpoints, which still resume
    "progress",
    "device",
    "num_threads",
    "eval_batch_size",
}


@dataclass
class TrainConfig:
    """Every hyper-parameter of a reconstruction training run (paper defaults unless noted).

    The budget is ``epochs`` (capped by ``max_epochs`` for short runs), ended sooner only by
    early stopping with ``patience`` on the validation loss: both are counted in epochs, so the
    same config and seed give the same model on any machine. ``max_minutes`` is an opt-in
    safety valve, off by default (None): it stops before an epoch that would overrun it
    (estimated from the previous epoch; at least one epoch always runs), so when it binds the
    result depends on the machine's speed and load (see :class:`runtime.training.Budget`). ``mode="riad"`` trains
    the same network with RIAD's disjoint grid masks (one cell size from ``riad_ks`` per batch).
    ``batch_size`` is the global batch: with N processes each takes about ``batch_size / N`` of it.
    """

    mode: Literal["single", "riad"] = "single"
    unet: UNetConfig = field(default_factory=lambda: UNetConfig.profile("cpu"))
    epochs: int = 60  # configs/default.yaml's unet.epochs
    patience: int = 10  # configs/default.yaml's unet.patience
    lr: float = 1e-4
    batch_size: int = 4
    eval_batch_size: int = 8
    loss_weights: LossWeights = LossWeights()
    mask_margin: float = 0.0
    box_weight: float = 1.0  # loss weight of the masked box's pixels against the rest (paper: 1)
    riad_ks: tuple[int, ...] = (2, 4, 8, 16)
    riad_n_masks: int = 3
    seed: int = 0
    device: str = "auto"
    max_epochs: int | None = None
    max_minutes: float | None = None  # opt-in wall-clock cap; a binding cap makes results machine-dependent
    num_threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The flat settings that checkpoints and cache keys hold (frozen: a new key would move every key).

        >>> d = TrainConfig(loss_weights=LossWeights(l2=2.0)).to_dict()
        >>> [k for k in d if k.endswith("_weight")], d["l2_weight"]
        (['l2_weight', 'ssim_weight', 'msgms_weight'], 2.0)
        """
        d: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if k == "loss_weights":  # one flat key per term
                d.update({f"{term}_weight": v[term] for term in ("l2", "ssim", "msgms")})
            else:
                d[k] = v
        d["riad_ks"] = list(self.riad_ks)
        if self.box_weight == 1.0:  # left out at the paper's value, so paper-loss models keep their cache keys
            del d["box_weight"]
        if d["unet"].get("encoder", "none") == "none":  # the U-Net without a pretrained encoder: likewise
            d["unet"].pop("encoder", None)
        return d


@dataclass
class TrainResult:
    """The trained model (best weights, eval mode) and the run's record."""

    model: UNet
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stop_reason: str  # "patience" | "epochs" | "time"


def _tensors(arrays: ScanArrays, boxes: np.ndarray | None, mode: str, what: str) -> tuple[Tensor, np.ndarray]:
    imgs = np.asarray(arrays.images, dtype=np.float32)
    if imgs.ndim != 3:
        raise ValueError(f"{what} images must be [N, S, S], got {imgs.shape}")
    if np.any(np.asarray(arrays.labels) == DISTENDED):
        raise ValueError(f"{what} set contains distended scans; LoRIS trains on non-distended scans only")
    b = np.asarray(arrays.boxes if boxes is None else boxes, dtype=np.float32).reshape(-1, 4)
    if b.shape[0] != imgs.shape[0]:
        raise ValueError(f"{what}: {b.shape[0]} boxes for {imgs.shape[0]} images")
    if mode == "single" and np.isnan(b).any():
        raise ValueError(f"{what}: single-mask training needs a box for every scan (pass boxes= overrides)")
    return torch.from_numpy(imgs).unsqueeze(1) * 2 - 1, b


def _riad_draw(shape: torch.Size, cfg: TrainConfig, gen: torch.Generator, device: torch.device) -> Tensor:
    """One batch's RIAD masks: a cell size from ``riad_ks``, then the masks, both drawn from ``gen``."""
    k = cfg.riad_ks[int(torch.randint(len(cfg.riad_ks), (1,), generator=gen))]
    return riad_masks(shape[-2], shape[-1], k, cfg.riad_n_masks, gen, device)


def _step_inputs(
    model: nn.Module, x: Tensor, boxes: np.ndarray, cfg: TrainConfig, gen: torch.Generator, masks: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Reconstruction of a batch under the run's masking scheme (RIAD ``masks`` drawn from ``gen`` unless given),
    and the loss's pixel weight: ``box_weight`` inside the single mask, 1 outside (None when the paper's 1)."""
    if cfg.mode == "single":
        masked, m = apply_single_mask(x, boxes, cfg.mask_margin)
        weight = None if cfg.box_weight == 1.0 else 1 + (cfg.box_weight - 1) * m.to(x.dtype)
        return model(masked), weight
    m = _riad_draw(x.shape, cfg, gen, x.device) if masks is None else masks
    return compose_riad(model(apply_riad_masks(x, m)), m), None


def evaluate_loss(
    model: nn.Module,
    images: Tensor,
    boxes: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    shard_batches: bool = False,
) -> float:
    """Mean loss over the whole set (batch losses weighted by batch size); RIAD masks use a fixed seed.

    ``shard_batches`` (a collective call: every rank must make it) splits the batches between
    ranks, batch ``i`` to rank ``i % world_size``, with the same batches and masks as one process,
    and all-reduces the mean.
    """
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # same masks every epoch: comparable losses
    total, n = 0.0, 0
    split = shard_batches and is_distributed()
    with torch.inference_mode():
        for i, s in enumerate(range(0, images.shape[0], cfg.eval_batch_size)):
            # every rank draws every batch's masks, so the stream stays that of one process
            masks = _riad_draw(images.shape, cfg, gen, device) if cfg.mode == "riad" else None
            if split and i % world_size() != rank():
                continue
            x = images[s : s + cfg.eval_batch_size].to(device)
            recon, weight = _step_inputs(model, x, boxes[s : s + cfg.eval_batch_size], cfg, gen, masks)
            _, parts = reconstruction_loss(recon, x, cfg.loss_weights, weight)
            total += parts["total"] * x.shape[0]
            n += x.shape[0]
    if split:
        return all_reduce_mean(total / max(n, 1), weight=n)
    return total / max(n, 1)


def _check_resume(saved: dict[str, Any], current: dict[str, Any]) -> None:
    diff = {k for k in set(saved) | set(current) if k not in _BUDGET_KEYS and saved.get(k) != current.get(k)}
    if diff:
        raise ValueError(f"workdir checkpoint was made with a different config ({sorted(diff)}); use a fresh workdir")


def train_unet(
    train: ScanArrays,
    val: ScanArrays | None,
    config: TrainConfig | None = None,
    workdir: str | Path | None = None,
    train_boxes: np.ndarray | None = None,
    val_boxes: np.ndarray | None = None,
) -> TrainResult:
    """Train a U-Net on non-distended ``train`` scans, early-stopping on ``val``.

    ``train_boxes``/``val_boxes`` override the scans' boxes (e.g. expanded or detected boxes).
    Without a validation set, early stopping watches the training loss. Re-running with the
    same ``workdir`` resumes from ``workdir/last.pt``; ``epochs``, ``patience``,
    ``max_epochs``, ``max_minutes`` and ``device`` may change between runs. The torch thread
    count and global RNG are the caller's again afterwards.
    """
    cfg = config or TrainConfig()
    if cfg.mode not in ("single", "riad"):
        raise ValueError(f"unknown mode {cfg.mode!r}")
    if cfg.patience < 1 or cfg.batch_size < 1:
        raise ValueError("patience and batch_size must be at least 1")
    if cfg.batch_size < world_size():
        raise ValueError(f"batch_size is the global batch: at least one scan for each of the {world_size()} processes")
    device = torch.device(resolve_device(cfg.device))
    with training_scope(cfg.seed, cfg.num_threads, device):
        return _train(train, val, cfg, device, workdir, train_boxes, val_boxes)


@dataclass
class _Run:
    """The state of a training run that a checkpoint carries (``last.pt``)."""

    model: UNet
    opt: torch.optim.Optimizer
    gen: torch.Generator  # shuffling and RIAD masks: one stream, saved on resume
    stopper: EarlyStopping
    best_state: dict[str, Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    elapsed: float = 0.0


def _epoch_cap(cfg: TrainConfig) -> int:
    return min(cfg.epochs, cfg.max_epochs) if cfg.max_epochs is not None else cfg.epochs


def _start(cfg: TrainConfig, device: torch.device, wd: Path | None) -> _Run:
    """A fresh run from the seed (the global RNG is seeded by the caller), or the one in ``wd/last.pt``."""
    # channels-last: mkldnn's NHWC convolutions run a CPU step faster (same maths; parameters
    # load back into contiguous models unchanged)
    model = UNet(cfg.unet).to(device).to(memory_format=torch.channels_last)
    run = _Run(
        model=model,
        opt=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        gen=streams(cfg.seed).torch,
        stopper=EarlyStopping(cfg.patience),
        best_state=copy.deepcopy(model.state_dict()),
    )
    if wd is None or not (wd / LAST).exists():
        return run
    ck = load_state(wd / LAST, map_location=device, hint=f"delete {wd} to restart this training")
    _check_resume(ck["config"], cfg.to_dict())
    if int(ck["epoch"]) > _epoch_cap(cfg):
        raise ValueError(
            f"workdir checkpoint has trained {int(ck['epoch'])} epochs, more than this run's budget "
            f"of {_epoch_cap(cfg)}; use a fresh workdir"
        )
    model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    run.best_state = ck["best_state"]
    run.gen.set_state(ck["gen_state"].cpu())  # map_location may have moved them to the GPU
    torch.set_rng_state(ck["torch_rng"].cpu())
    run.stopper = EarlyStopping(cfg.patience, best=ck["best_val"], best_at=ck["best_epoch"], bad=ck["bad"])
    run.history, run.epoch, run.elapsed = ck["history"], int(ck["epoch"]), float(ck["elapsed"])
    return run


def _save_last(run: _Run, cfg: TrainConfig, path: Path, elapsed: float) -> None:
    state = {
        "format": _FORMAT,
        "config": cfg.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "best_state": run.best_state,
        "gen_state": run.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": run.epoch,
        "best_val": run.stopper.best,
        "best_epoch": run.stopper.best_at,
        "bad": run.stopper.bad,
        "history": run.history,
        "elapsed": elapsed,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _train_epoch(run: _Run, net: nn.Module, xt: Tensor, bt: np.ndarray, cfg: TrainConfig) -> float:
    """One pass over the shuffled training set through ``net`` (the model, or its DDP wrapper);
    the mean training loss over every rank's scans."""
    run.model.train()
    n = xt.shape[0]
    perm = torch.randperm(n, generator=run.gen)  # the same on every rank: one seed, one stream
    total, seen = 0.0, 0
    for s in range(0, n, cfg.batch_size):
        batch = perm[s : s + cfg.batch_size]
        idx = shard(batch)  # this rank's strided share of the global batch
        count, scale = len(idx), loss_scale(len(idx), len(batch))
        if count == 0:  # a short last batch can leave a rank none: it steps on zero-weighted scans
            idx = batch
        x = xt[idx.to(xt.device)]
        recon, weight = _step_inputs(net, x, bt[idx.numpy()], cfg, run.gen)
        loss, parts = reconstruction_loss(recon, x, cfg.loss_weights, weight)
        if is_distributed():
            loss = loss * scale  # DDP's mean over ranks becomes the mean over the global batch
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        total += parts["total"] * count
        seen += count
    return all_reduce_mean(total / max(seen, 1), weight=seen)


def _train(
    train: ScanArrays,
    val: ScanArrays | None,
    cfg: TrainConfig,
    device: torch.device,
    workdir: str | Path | None,
    train_boxes: np.ndarray | None,
    val_boxes: np.ndarray | None,
) -> TrainResult:
    xt, bt = _tensors(train, train_boxes, cfg.mode, "train")
    has_val = val is not None and len(val) > 0
    xv, bv = _tensors(val, val_boxes, cfg.mode, "val") if val is not None and has_val else (xt, bt)
    xt, xv = xt.to(device), xv.to(device)
    wd = Path(workdir) if workdir is not None else None
    if wd is not None:
        wd.mkdir(parents=True, exist_ok=True)
    run = _start(cfg, device, wd)
    net = wrap(run.model)  # DDP when distributed: it copies rank 0's weights to every rank
    cap = _epoch_cap(cfg)
    budget = Budget(cap, cfg.max_minutes, stopper=run.stopper, start=run.epoch, elapsed=run.elapsed, unit="epochs")
    bar = tqdm(
        total=cap,
        initial=min(run.epoch, cap),
        desc=f"unet[{cfg.mode}]",
        unit="ep",
        disable=not cfg.progress or not is_main(),
        dynamic_ncols=True,
    )
    for epoch in budget.units():
        e0 = time.perf_counter()
        train_loss = _train_epoch(run, net, xt, bt, cfg)
        sync_buffers(run.model)  # rank 0's BatchNorm statistics: every rank validates and keeps one model
        val_loss = evaluate_loss(run.model, xv, bv, cfg, device, shard_batches=True) if has_val else train_loss
        seconds = time.perf_counter() - e0
        if run.stopper.update(val_loss, at=epoch):
            run.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        run.history.append({"epoch": float(epoch), "train_loss": train_loss, "val_loss": val_loss, "seconds": seconds})
        run.epoch = epoch + 1
        bar.update(1)
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=f"{run.stopper.best:.4f}")
        if wd is not None and is_main():
            _save_last(run, cfg, wd / LAST, budget.spent())
    bar.close()
    return _finish(run, cfg, wd, budget.stop_reason)


def _finish(run: _Run, cfg: TrainConfig, wd: Path | None, stop: str) -> TrainResult:
    """The best weights in eval mode, written to ``wd/best`` with the run's record."""
    run.model.load_state_dict(run.best_state)
    run.model.eval()
    if wd is not None and is_main():
        meta = {
            "mode": cfg.mode,
            "train_config": cfg.to_dict(),
            "best_epoch": run.stopper.best_at,
            "best_val_loss": run.stopper.best,
            "epochs_run": run.epoch,
            "stop_reason": stop,
        }
        save_model(run.model, wd / BEST_DIR, meta=meta)
    barrier()  # the other ranks return once rank 0's files are there
    return TrainResult(run.model, run.history, run.stopper.best_at, run.stopper.best, run.epoch, stop)
