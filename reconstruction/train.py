"""Train the inpainting U-Net on non-distended scans (LoRIS single mask, or RIAD multi-masks).

Early stopping watches the mean validation loss over the whole validation set (the authors'
code used the last batch only); the best weights are kept. With a ``workdir`` the run writes
``last.pt`` after every epoch (tensors and plain data only, read back with
``torch.load(weights_only=True)``) and resumes from it, and writes the best model to
``workdir/best`` (see :mod:`reconstruction.checkpoint`).

>>> import numpy as np
>>> from scans.records import ScanArrays
>>> rng = np.random.default_rng(0); n = 4
>>> arr = ScanArrays(rng.random((n, 32, 32), dtype=np.float32), np.tile(np.float32([8, 8, 20, 16]), (n, 1)),
...                  np.zeros((n, 32, 32), bool), np.zeros(n, np.int64), np.arange(n), ["p"] * n, np.ones((n, 2), np.float32))
>>> res = train_unet(arr, arr, TrainConfig(unet=UNetConfig.profile("tiny"), max_epochs=2, progress=False))
>>> res.epochs_run, len(res.history)
(2, 2)
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from reconstruction.checkpoint import atomic_save, save_model
from reconstruction.infer import resolve_device
from reconstruction.losses import LossWeights, reconstruction_loss
from reconstruction.masking import apply_riad_masks, apply_single_mask, compose_riad, riad_masks
from reconstruction.unet import UNet, UNetConfig
from scans.records import DISTENDED, ScanArrays

LAST = "last.pt"
BEST_DIR = "best"
_FORMAT = 1
# settings that may change between a run and its resumption without changing the result's meaning:
# the budget may be extended (more epochs, a cap lifted) and the run goes on from its last epoch;
# a checkpoint already past this run's epoch budget is refused (see _train). Callers that cache
# finished models must key them on these too (pipeline.stages.unet_cache_dir keys the whole config).
_BUDGET_KEYS = {
    "epochs",
    "patience",
    "max_epochs",
    "max_train_seconds",
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
    same config and seed give the same model on any machine. ``max_train_seconds`` is an opt-in
    safety valve, off by default (None): it stops before an epoch that would overrun it
    (estimated from the previous epoch; at least one epoch always runs), so when it binds the
    result depends on the machine's speed and load. ``mode="riad"`` trains
    the same network with RIAD's disjoint grid masks (one cell size from ``riad_ks`` per batch).
    """

    mode: Literal["single", "riad"] = "single"
    unet: UNetConfig = field(default_factory=lambda: UNetConfig.profile("cpu"))
    epochs: int = 1000
    patience: int = 50
    lr: float = 1e-4
    batch_size: int = 4
    eval_batch_size: int = 8
    l2_weight: float = 1.0
    ssim_weight: float = 1.0
    msgms_weight: float = 1.0
    mask_margin: float = 0.0
    riad_ks: tuple[int, ...] = (2, 4, 8, 16)
    riad_n_masks: int = 3
    seed: int = 0
    device: str = "auto"
    max_epochs: int | None = None
    max_train_seconds: float | None = None  # opt-in wall-clock cap; a binding cap makes results machine-dependent
    num_threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["riad_ks"] = list(self.riad_ks)
        return d

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(l2=self.l2_weight, ssim=self.ssim_weight, msgms=self.msgms_weight)


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


def _step_inputs(model: nn.Module, x: Tensor, boxes: np.ndarray, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Reconstruction of a batch under the run's masking scheme."""
    if cfg.mode == "single":
        return model(apply_single_mask(x, boxes, cfg.mask_margin)[0])
    k = cfg.riad_ks[int(torch.randint(len(cfg.riad_ks), (1,), generator=gen))]
    m = riad_masks(x.shape[-2], x.shape[-1], k, cfg.riad_n_masks, gen, x.device)
    return compose_riad(model(apply_riad_masks(x, m)), m)


def evaluate_loss(model: nn.Module, images: Tensor, boxes: np.ndarray, cfg: TrainConfig, device: torch.device) -> float:
    """Mean loss over the whole set (batch losses weighted by batch size); RIAD masks use a fixed seed."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # same masks every epoch: comparable losses
    total, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, images.shape[0], cfg.eval_batch_size):
            x = images[s : s + cfg.eval_batch_size].to(device)
            _, parts = reconstruction_loss(
                _step_inputs(model, x, boxes[s : s + cfg.eval_batch_size], cfg, gen), x, cfg.loss_weights
            )
            total += parts["total"] * x.shape[0]
            n += x.shape[0]
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
    ``max_epochs``, ``max_train_seconds`` and ``device`` may change between runs.
    """
    cfg = config or TrainConfig()
    if cfg.mode not in ("single", "riad"):
        raise ValueError(f"unknown mode {cfg.mode!r}")
    if cfg.patience < 1 or cfg.batch_size < 1:
        raise ValueError("patience and batch_size must be at least 1")
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(train, val, cfg, workdir, train_boxes, val_boxes)
    finally:
        torch.set_num_threads(old_threads)


def _train(
    train: ScanArrays,
    val: ScanArrays | None,
    cfg: TrainConfig,
    workdir: str | Path | None,
    train_boxes: np.ndarray | None,
    val_boxes: np.ndarray | None,
) -> TrainResult:
    device = resolve_device(cfg.device)
    xt, bt = _tensors(train, train_boxes, cfg.mode, "train")
    has_val = val is not None and len(val) > 0
    xv, bv = _tensors(val, val_boxes, cfg.mode, "val") if has_val else (xt, bt)
    xt, xv = xt.to(device), xv.to(device)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # shuffling and RIAD masks: one stream, saved on resume
    # channels-last: mkldnn's NHWC convolutions made a cpu-profile step ~1.3x faster on the
    # 2-core CPU (same maths; parameters load back into contiguous models unchanged)
    model = UNet(cfg.unet).to(device=device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state: dict[str, Any] = {
        "epoch": 0,
        "best_val": math.inf,
        "best_epoch": -1,
        "bad": 0,
        "history": [],
        "elapsed": 0.0,
    }
    best_state = copy.deepcopy(model.state_dict())

    wd = Path(workdir) if workdir is not None else None
    if wd is not None:
        wd.mkdir(parents=True, exist_ok=True)
        if (wd / LAST).exists():
            ck = torch.load(wd / LAST, map_location=device, weights_only=True)
            _check_resume(ck["config"], cfg.to_dict())
            cap_now = min(cfg.epochs, cfg.max_epochs) if cfg.max_epochs is not None else cfg.epochs
            if int(ck["epoch"]) > cap_now:
                raise ValueError(
                    f"workdir checkpoint has trained {int(ck['epoch'])} epochs, more than this run's budget "
                    f"of {cap_now}; use a fresh workdir"
                )
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            best_state = ck["best_state"]
            gen.set_state(ck["gen_state"].cpu())  # map_location may have moved them to the GPU
            torch.set_rng_state(ck["torch_rng"].cpu())
            state = {k: ck[k] for k in state}

    cap = min(cfg.epochs, cfg.max_epochs) if cfg.max_epochs is not None else cfg.epochs
    n = xt.shape[0]
    last_epoch_s, stop, ran = 0.0, "epochs", 0
    bar = tqdm(
        total=cap,
        initial=min(state["epoch"], cap),
        desc=f"unet[{cfg.mode}]",
        unit="ep",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    while state["epoch"] < cap:
        if state["bad"] >= cfg.patience:
            stop = "patience"
            break
        # the budget counts every call of a resumed run, so a kill and resume trains no longer than an
        # uninterrupted run; the first epoch always runs so a model always comes back
        if (
            cfg.max_train_seconds is not None
            and (ran or state["epoch"] > 0)
            and state["elapsed"] + last_epoch_s > cfg.max_train_seconds
        ):
            stop = "time"
            break
        e0 = time.monotonic()
        model.train()
        perm = torch.randperm(n, generator=gen)
        run, seen = 0.0, 0
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            x = xt[idx.to(device)]
            loss, parts = reconstruction_loss(_step_inputs(model, x, bt[idx.numpy()], cfg, gen), x, cfg.loss_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += parts["total"] * x.shape[0]
            seen += x.shape[0]
        train_loss = run / max(seen, 1)
        val_loss = evaluate_loss(model, xv, bv, cfg, device) if has_val else train_loss
        last_epoch_s = time.monotonic() - e0
        ran += 1
        state["elapsed"] += last_epoch_s
        if val_loss < state["best_val"]:
            state.update(best_val=val_loss, best_epoch=state["epoch"], bad=0)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad"] += 1
        state["history"].append(
            {"epoch": float(state["epoch"]), "train_loss": train_loss, "val_loss": val_loss, "seconds": last_epoch_s}
        )
        state["epoch"] += 1
        bar.update(1)
        bar.set_postfix(
            epoch=state["epoch"], train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=f"{state['best_val']:.4f}"
        )
        if wd is not None:
            atomic_save(
                {
                    "format": _FORMAT,
                    "config": cfg.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "best_state": best_state,
                    "gen_state": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    **state,
                },
                wd / LAST,
            )
    else:
        if state["bad"] >= cfg.patience:
            stop = "patience"
    bar.close()

    model.load_state_dict(best_state)
    model.eval()
    if wd is not None:
        save_model(
            model,
            wd / BEST_DIR,
            meta={
                "mode": cfg.mode,
                "train_config": cfg.to_dict(),
                "best_epoch": state["best_epoch"],
                "best_val_loss": state["best_val"],
                "epochs_run": state["epoch"],
                "stop_reason": stop,
            },
        )
    return TrainResult(model, state["history"], state["best_epoch"], state["best_val"], state["epoch"], stop)
