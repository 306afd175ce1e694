"""The fitters: detector, box refiner and U-Net of one fold, each trained once and cached
(:mod:`pipeline.shared.cache`).

Each returns the model and a summary (``fit_s``, ``cached``, ``cache`` and the trainer's own keys).

Under ``torchrun --nproc-per-node N`` every rank calls each fitter with the same data and config:
the U-Net, RIAD, the box refiner and Co-DETR train with DistributedDataParallel on every rank;
a detector without a DDP loop (YOLOv5u, which has its own multi-GPU launcher) trains on rank 0
alone, on every GPU of the node, while the others wait; the cache decides on rank 0
(:func:`pipeline.shared.cache.fit_or_load`), and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from detectors.base import Detector, build_detector, detector_class
from detectors.refine import BoxRefiner, RefinedDetector, RefinerConfig
from pipeline.config import LOSS_WEIGHT_ORDER, Config, DetectorConfig, RiadConfig, UNetSettings, detector_config_path
from pipeline.shared.cache import CacheScope, cache_lock, cache_root, fit_or_load, publish
from pipeline.shared.data import Data
from pipeline.shared.priors import Expansion, expand_all, training_subset
from runtime.device import resolve_device
from runtime.distributed import is_distributed, is_main
from runtime.timing import Stopwatch
from scans.records import ScanArrays

# Versions of each cache key's layout: a new one retrains every model of that kind.
DETECTOR_KEY_VERSION = 1
UNET_KEY_VERSION = 1
REFINER_KEY_VERSION = 2
# Settings whose cache-key name and unit differ from the code's (the key's are frozen).
_UNET_KEY_NAMES = {"max_minutes": ("max_train_seconds", 60.0)}
_REFINER_KEY_NAMES = {"max_minutes": ("max_seconds", 60.0)}


def legacy_names(settings: dict[str, Any], renames: dict[str, tuple[str, float]]) -> dict[str, Any]:
    """``settings`` with the keys of ``renames`` under their cache-key name and unit.

    >>> legacy_names({"max_minutes": 2.0, "steps": 5}, {"max_minutes": ("max_seconds", 60.0)})
    {'max_seconds': 120.0, 'steps': 5}
    """
    out = {}
    for k, v in settings.items():
        old, scale = renames.get(k, (k, 1.0))
        out[old] = v * scale if old != k and v is not None else v
    return out


Mode = Literal["single", "riad"]  # the LoRIS U-Net or the RIAD baseline


def scope(data: Data, size: int, frame: int, train_idx: np.ndarray, val_idx: np.ndarray) -> CacheScope:
    """The cache scope of models trained on ``train_idx`` and validated on ``val_idx`` of ``data``."""
    ids = data.arrays.ids
    return CacheScope(data.fingerprint, size, frame, tuple(ids[train_idx].tolist()), tuple(ids[val_idx].tolist()))


def detector_kwargs(det: DetectorConfig, path: Path | None, seed: int, device: str) -> dict[str, Any]:
    """Keyword arguments for the detector: its YAML config's keys (or the path of its Python config),
    then ``detector.options``, the device and the seed."""
    kwargs: dict[str, Any] = {}
    if path is not None and path.suffix in (".yaml", ".yml"):
        kwargs.update(yaml.safe_load(path.read_text()) or {})
    elif path is not None:
        kwargs["config_file"] = str(path)
    kwargs.update(det.options)
    kwargs["device"] = device
    kwargs["seed"] = seed
    return kwargs


def _detector_key(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The detector's own part of its cache key. Inference-only settings stay out (changing them must
    not retrain); the training budget is in the kwargs or the parsed config file, ``_base_`` files merged,
    so editing a comment never retrains."""
    inference = detector_class(name).INFERENCE_KEYS
    key: dict[str, Any] = {
        "detector": name,
        "kwargs": {k: v for k, v in kwargs.items() if k not in ("device", "config_file") and k not in inference},
    }
    if "config_file" not in kwargs:
        key["config_text"] = None  # keeps YAML-configured detectors' existing keys
    else:
        from mmengine.config import Config as MMConfig

        key["config"] = MMConfig.fromfile(kwargs["config_file"]).to_dict()
        key["config_name"] = Path(kwargs["config_file"]).name
    return key


def detector_entry(name: str, kwargs: dict[str, Any], where: CacheScope, root: Path) -> Path:
    """The cache entry of detector ``name`` trained with ``kwargs`` (:func:`detector_kwargs`) in ``where``."""
    return where.entry(root, f"det-{name}", version=DETECTOR_KEY_VERSION, **_detector_key(name, kwargs))


def fit_detector(
    cfg: Config, data: Data, train_idx: np.ndarray, val_idx: np.ndarray, workdir: Path
) -> tuple[Detector, dict[str, Any]]:
    """Train ``cfg.detector.name`` on its training subset, or reuse the cached one; then its box refiner
    (``detector.refine``). Training logs go to ``workdir``."""
    det_cfg, arr = cfg.detector, data.arrays
    tr = training_subset(arr, train_idx, det_cfg.train_classes)
    va = training_subset(arr, val_idx, det_cfg.train_classes)
    device = resolve_device(cfg.device)
    path = detector_config_path(det_cfg.name, det_cfg.config, cfg.profile)
    kwargs = detector_kwargs(det_cfg, path, cfg.seed, device)
    where = scope(data, cfg.image_size, cfg.frame, tr, va)
    entry = detector_entry(det_cfg.name, kwargs, where, cache_root(cfg.cache_dir))
    every = trains_on_every_rank(det_cfg.name)
    if not every:
        kwargs["device"] = solo_device(device)
    with contextlib.nullcontext() if every else outside_torchrun():
        det, info = fit_or_load(
            entry,
            detector_class(det_cfg.name).load,
            lambda: _train_detector(det_cfg.name, kwargs, arr, tr, va, entry, Path(workdir)),
            every_rank=every,
            lock=cache_lock,
        )
    if info["cached"] or not is_main():  # a loaded detector takes this run's inference settings
        det.set_inference(**{k: v for k, v in kwargs.items() if k in det.INFERENCE_KEYS})
    if not det_cfg.refine or det.ground_truth:
        return det, info
    refiner, rinfo = fit_refiner(det_cfg.refiner, cfg.seed, where, cache_root(cfg.cache_dir), device, arr, tr, va)
    return RefinedDetector(det, refiner), {**info, "refiner": rinfo}


def _train_detector(
    name: str, kwargs: dict[str, Any], arr: ScanArrays, tr: np.ndarray, va: np.ndarray, entry: Path, workdir: Path
) -> tuple[Detector, dict[str, Any]]:
    det = build_detector(name, **kwargs)
    watch = Stopwatch()
    with watch("fit"):
        info = det.fit(arr.subset(tr), arr.subset(va), workdir / "train")
    info = {
        "fit_s": watch.seconds["fit"],
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "n_train_distended": int(arr.labels[tr].sum()),
        **(info or {}),
    }
    if is_main():
        publish(entry, det.save, info)
    return det, info


# What torchrun sets for its workers: hidden while a detector without a DDP loop trains on rank 0.
_TORCHRUN_VARS = (
    *("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE"),
    *("ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
    *("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID"),
    *("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE"),
)


def trains_on_every_rank(name: str) -> bool:
    """True when detector ``name`` trains with DDP on every torchrun rank (its class's
    ``distributed_fit``, else the built-in list); the others train on rank 0 alone.

    >>> trains_on_every_rank("codetr"), trains_on_every_rank("yolov5")
    (True, False)
    """
    return detector_class(name).distributed_fit


def solo_device(device: str) -> str:
    """Rank 0's device for a detector trained on rank 0 alone under torchrun: ``cuda`` becomes every GPU
    of the node (``cuda:0,1,...``, for ultralytics' own multi-GPU launcher); anything else as given.

    >>> solo_device("cpu"), solo_device("cuda:0,1")
    ('cpu', 'cuda:0,1')
    """
    if device != "cuda" or not is_distributed():
        return device
    import torch

    n = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or torch.cuda.device_count()
    return "cuda:" + ",".join(str(i) for i in range(n))


@contextlib.contextmanager
def outside_torchrun() -> Iterator[None]:
    """Hide torchrun's variables from the block (a no-op in one process), so that a detector without a
    DDP loop trains as one plain process: ultralytics reads ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` when
    first imported and would otherwise shard its data, join LoRIS's process group and wait in it."""
    if not is_distributed():
        yield
        return
    utils = sys.modules.get("ultralytics.utils")
    if utils is not None and getattr(utils, "RANK", -1) != -1:
        raise RuntimeError(
            "ultralytics was imported in this torchrun rank before LoRIS hid torchrun's variables, so its "
            "trainer would join LoRIS's process group; let only the detector import it"
        )
    saved = {k: os.environ.pop(k) for k in _TORCHRUN_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def refiner_key(options: dict[str, Any]) -> dict[str, Any]:
    """Every training setting of the refiner resolved over :class:`RefinerConfig`'s defaults (so the
    budget is in the key even when left at its default); inference-only settings stay out."""
    resolved = {**dataclasses.asdict(RefinerConfig()), **options}
    training = {k: v for k, v in resolved.items() if k not in BoxRefiner.INFERENCE_KEYS}
    return legacy_names(training, _REFINER_KEY_NAMES)


def refiner_options(refiner: Any, seed: int) -> dict[str, Any]:
    """The refiner's settings (``detector.refiner``), seeded by the run's ``seed`` unless they name one."""
    return {**dict(refiner), "seed": dict(refiner).get("seed", seed)}


def refiner_entry(options: dict[str, Any], where: CacheScope, root: Path) -> Path:
    """The cache entry of a refiner trained with ``options`` (:func:`refiner_options`) in ``where``."""
    return where.entry(root, "refiner", version=REFINER_KEY_VERSION, refiner=refiner_key(options))


def fit_refiner(
    refiner: Any,
    seed: int,
    where: CacheScope,
    root: Path,
    device: str,
    arr: ScanArrays,
    tr: np.ndarray,
    va: np.ndarray,
) -> tuple[BoxRefiner, dict[str, Any]]:
    """Train the box refiner (settings ``refiner`` over its defaults) on the scans the detector trained
    on, or reuse the cached one. It depends on no detector: one cached refiner serves them all."""
    options = refiner_options(refiner, seed)
    entry = refiner_entry(options, where, root)

    def train() -> tuple[BoxRefiner, dict[str, Any]]:
        ref = BoxRefiner(device=device, **options)
        watch = Stopwatch()
        with watch("fit"):
            info = ref.fit(arr.images[tr], arr.boxes[tr], arr.images[va], arr.boxes[va])
        info = {"fit_s": watch.seconds["fit"], "n_train": int(len(tr)), **info}
        if is_main():
            publish(entry, ref.save, info)
        return ref, info

    ref, info = fit_or_load(entry, lambda e: BoxRefiner.load(e, device=device), train, lock=cache_lock)
    if info["cached"] or not is_main():
        ref.set_inference(**{k: v for k, v in options.items() if k in BoxRefiner.INFERENCE_KEYS})
    return ref, info


# ----------------------------------------------------------------------------- U-Net


def train_config(unet: UNetSettings, riad: RiadConfig, mode: Mode, seed: int, device: str, progress: bool) -> Any:
    """The :class:`reconstruction.train.TrainConfig` of the LoRIS U-Net (``mode="single"``) or RIAD (whose
    random masks already weigh every pixel alike, so ``box_weight`` is the single mask's only): the one
    translation of the config's ``unet`` and ``riad`` sections for the trainer."""
    from reconstruction.losses import LossWeights
    from reconstruction.train import TrainConfig
    from reconstruction.unet import UNetConfig

    budget = riad if mode == "riad" else unet
    return TrainConfig(
        mode=mode,
        unet=UNetConfig.profile(unet.profile),
        epochs=budget.epochs,
        patience=budget.patience,
        lr=unet.lr,
        batch_size=unet.batch_size,
        loss_weights=LossWeights(**dict(zip(LOSS_WEIGHT_ORDER, unet.loss_weights))),
        mask_margin=unet.mask_margin,
        box_weight=unet.box_weight if mode == "single" else 1.0,
        riad_ks=riad.ks,
        seed=seed,
        device=resolve_device(device),
        max_minutes=budget.max_minutes or None,
        progress=progress,
    )


MEMBER_SEED_STRIDE = 1_000_003  # a prime: member k's training seed, seed + k * stride, meets no run seed


def _train_config(cfg: Config, mode: Mode, member: int = 0) -> Any:
    seed = cfg.seed + member * MEMBER_SEED_STRIDE
    return train_config(cfg.unet, cfg.riad, mode, seed, cfg.device, cfg.progress)


def unet_cache_dir(cfg: Config, where: CacheScope, mode: Mode, member: int = 0) -> Path:
    """Cache folder keyed by everything a trained U-Net depends on: data, fold, config, seed.

    The training config in the key holds the budget (``epochs``, ``patience``) and the opt-in
    time cap, so a U-Net trained under another budget is never reused as this one; a killed
    training resumes from ``<entry>/work`` of the same key."""
    tc = {k: v for k, v in _train_config(cfg, mode, member).to_dict().items() if k not in ("progress", "device")}
    tc = legacy_names(tc, _UNET_KEY_NAMES)
    expand = [cfg.detector.expand_up, cfg.detector.expand_side]
    root = cache_root(cfg.cache_dir)
    return where.entry(root, f"unet-{mode}", version=UNET_KEY_VERSION, train_cfg=tc, expand=expand)


def fit_unet(
    cfg: Config, data: Data, train_idx: np.ndarray, val_idx: np.ndarray, mode: Mode = "single", member: int = 0
) -> tuple[Any, dict[str, Any]]:
    """A trained U-Net for this fold: from the cache when present, else trained and cached.

    Trains on normal scans with ground-truth boxes (expanded by the prior rule, so the mask
    geometry matches inference). A killed training resumes from its last checkpoint. ``member``
    k > 0 trains the same U-Net from another seed (a seed ensemble's k-th member; data and folds
    unchanged).
    """
    from reconstruction.checkpoint import load_model

    arr = data.arrays
    train_idx = train_idx[arr.labels[train_idx] == 0]
    val_idx = val_idx[arr.labels[val_idx] == 0]
    entry = unet_cache_dir(cfg, scope(data, cfg.image_size, cfg.frame, train_idx, val_idx), mode, member)
    expansion = Expansion(cfg.detector.expand_up, cfg.detector.expand_side)
    tc = _train_config(cfg, mode, member)
    return fit_or_load(
        entry,
        lambda e: load_model(e, map_location=tc.device)[0],
        lambda: _train_unet(tc, expansion, arr, train_idx, val_idx, entry),
        lock=cache_lock,
    )


def _train_unet(
    tc: Any, expansion: Expansion, arr: ScanArrays, train_idx: np.ndarray, val_idx: np.ndarray, entry: Path
) -> tuple[Any, dict[str, Any]]:
    """Train (resuming from ``entry/work``); rank 0 writes the entry, ``DONE`` last."""
    from reconstruction.checkpoint import save_model
    from reconstruction.train import train_unet

    size = arr.images.shape[-1]
    watch = Stopwatch()
    with watch("fit"):
        res = train_unet(
            arr.subset(train_idx),
            arr.subset(val_idx),
            tc,
            workdir=entry / "work",
            train_boxes=expand_all(arr.boxes[train_idx], expansion, size),
            val_boxes=expand_all(arr.boxes[val_idx], expansion, size),
        )
    info = {
        "fit_s": watch.seconds["fit"],
        **{k: getattr(res, k) for k in ("best_epoch", "best_val_loss", "epochs_run", "stop_reason")},
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "mode": tc.mode,
    }
    if is_main():
        save_model(res.model, entry, meta=info)
        (entry / "history.json").write_text(json.dumps(res.history))
        (entry / "DONE").write_text(json.dumps(info))
        shutil.rmtree(entry / "work", ignore_errors=True)
    return res.model, info
