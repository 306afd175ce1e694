"""The stages of one fold, each a thin adapter between the packages (only ``pipeline`` imports them all).

detector fit -> priors -> U-Net fit (cached) -> reconstruction + maps -> evaluation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detectors.base import Detections, Detector, build_detector, detector_class
from detectors.prior import PriorPolicy, expand_box
from detectors.refine import BoxRefiner, RefinedDetector
from pipeline.config import detector_config_path
from pipeline.data import Data
from scans.records import ScanArrays


def resolve_device(cfg: dict[str, Any]) -> str:
    import torch

    dev = cfg.get("device", "auto")
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev


def set_threads(cfg: dict[str, Any]) -> None:
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


# ----------------------------------------------------------------------------- priors


def expand_all(boxes: np.ndarray, cfg: dict[str, Any], size: int) -> np.ndarray:
    """Apply the configured expansion to every box (the same rule for training and inference)."""
    up, side = float(cfg["detector"]["expand_up"]), float(cfg["detector"]["expand_side"])
    if up == 0 and side == 0:
        return boxes.astype(np.float32, copy=True)
    return np.array([expand_box(b, size, size, up=up, side=side) for b in boxes], dtype=np.float32)


@dataclass
class Priors:
    """One prior box per image, with where it came from and the raw detections behind it."""

    boxes: np.ndarray  # [N, 4] after expansion
    raw_boxes: np.ndarray  # [N, 4] before expansion (scored against ground truth)
    sources: list[str]
    confidences: np.ndarray
    detections: list[Detections] = field(default_factory=list)

    @property
    def fallbacks(self) -> int:
        return sum(s == "fallback" for s in self.sources)


def detector_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the detector: its YAML config's keys, or the path of its Python config."""
    import yaml

    path = detector_config_path(cfg)
    kwargs: dict[str, Any] = {}
    if path is not None and path.suffix in (".yaml", ".yml"):
        kwargs.update(yaml.safe_load(path.read_text()) or {})
    elif path is not None:
        kwargs["config_file"] = str(path)
    kwargs.update(cfg["detector"].get("options") or {})
    device = resolve_device(cfg)
    # ultralytics names CUDA devices by index
    kwargs["device"] = "0" if device == "cuda" and cfg["detector"]["name"] == "yolov5" else device
    kwargs["seed"] = cfg["seed"]
    return kwargs


def training_subset(arrays: ScanArrays, index: np.ndarray, train_classes: str) -> np.ndarray:
    """The indices a model may train on: normal scans only unless the ``all`` opt-in is set."""
    if train_classes == "all":
        return index
    if train_classes != "normal":
        raise ValueError(f"detector.train_classes must be 'normal' or 'all', not {train_classes!r}")
    return index[arrays.labels[index] == 0]


def cache_root(cfg: dict[str, Any]) -> Path:
    """Where trained models are cached across runs: ``cache_dir``, else ``$LORIS_CACHE/models``, else
    ``$XDG_CACHE_HOME/loris/models``, else ``~/.cache/loris/models``."""
    if cfg.get("cache_dir"):
        return Path(cfg["cache_dir"])
    base = os.environ.get("LORIS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loris"
    return Path(base) / "models"


@contextlib.contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Exclusive lock on one cache entry, so concurrent runs train it once and share it."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


def _key(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def fit_detector(
    cfg: dict[str, Any], data: Data, train_idx: np.ndarray, val_idx: np.ndarray, workdir: Path
) -> tuple[Detector, dict[str, Any]]:
    """Train the configured detector on its training subset, or reuse the cached one.

    A trained detector depends only on the data, the fold's ids, its config and the seed, so it
    is cached like the U-Nets and shared by ``run`` and ``ablate``. Training logs go to ``workdir``.
    """

    def _config_bases(path: Path) -> list[Path]:
        """The ``_base_`` files an mmengine-style python config inherits from, recursively, in order."""
        import ast

        out: list[Path] = []
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError):
            return out
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_base_" for t in node.targets):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                for rel in [value] if isinstance(value, str) else list(value):
                    base = (path.parent / rel).resolve()
                    if base.is_file():
                        out.extend(b for b in [*_config_bases(base), base] if b not in out)
        return out

    name = cfg["detector"]["name"]
    arr = data.arrays
    tr = training_subset(arr, train_idx, cfg["detector"]["train_classes"])
    va = training_subset(arr, val_idx, cfg["detector"]["train_classes"])
    kwargs = detector_kwargs(cfg)
    # Inference-only settings stay out of the key: changing them must not retrain the detector.
    # The training budget (epochs, and any opt-in time cap such as Co-DETR's max_minutes or an
    # ultralytics `time` in train_args) is in the kwargs or the config text, so a model trained
    # under another budget is never taken for this one.
    inference = detector_class(name).INFERENCE_KEYS
    key_doc = {
        "data": annotations_fingerprint(data.root),
        "size": cfg["image_size"],
        "frame": cfg.get("frame", 0),
        "train": arr.ids[tr].tolist(),
        "val": arr.ids[va].tolist(),
        "detector": name,
        "kwargs": {k: v for k, v in kwargs.items() if k != "device" and k not in inference},
        "config_text": Path(kwargs["config_file"]).read_text() if "config_file" in kwargs else None,
        "version": 1,
    }
    if "config_file" in kwargs:
        bases = _config_bases(Path(kwargs["config_file"]))
        if bases:  # a config built on `_base_` files (codetr_quick.py) also depends on their text
            key_doc["base_texts"] = [b.read_text() for b in bases]
    cache = cache_root(cfg) / f"det-{name}-{_key(key_doc)}"
    with cache_lock(cache):
        det, info = _fit_detector_locked(name, kwargs, arr, tr, va, cache, Path(workdir))
    if not cfg["detector"].get("refine", False) or name == "gt":
        return det, info
    refiner, rinfo = fit_refiner(cfg, data, tr, va)
    return RefinedDetector(det, refiner), {**info, "refiner": rinfo}


def _publish(cache: Path, save: Callable[[Path], None], info: dict[str, Any]) -> None:
    """Save into a sibling folder, mark it DONE, then rename it into place: atomic, so a
    half-saved model is never taken from the cache."""
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    (tmp / "DONE").write_text(json.dumps(info, default=str))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)


def fit_refiner(cfg: dict[str, Any], data: Data, tr: np.ndarray, va: np.ndarray) -> tuple[BoxRefiner, dict[str, Any]]:
    """Train the box refiner on the scans the detector trained on, or reuse the cached one.

    It depends on neither detector, so one cached refiner serves YOLOv5u and Co-DETR in a fold.
    """
    arr = data.arrays
    options = dict(cfg["detector"].get("refiner") or {})
    options.setdefault("seed", cfg["seed"])
    # The key holds every training setting resolved over RefinerConfig's defaults (so the step
    # budget `steps` and the opt-in `max_seconds` cap are in it even when the config leaves them
    # at their defaults); inference-only settings stay out: changing them must not retrain.
    from dataclasses import asdict

    from detectors.refine import RefinerConfig

    resolved = {**asdict(RefinerConfig()), **options}
    train_options = {k: v for k, v in resolved.items() if k not in BoxRefiner.INFERENCE_KEYS}
    key_doc = {
        "data": annotations_fingerprint(data.root),
        "size": cfg["image_size"],
        "frame": cfg.get("frame", 0),
        "train": arr.ids[tr].tolist(),
        "val": arr.ids[va].tolist(),
        "refiner": train_options,
        "version": 2,
    }
    cache = cache_root(cfg) / f"refiner-{_key(key_doc)}"
    device = resolve_device(cfg)
    with cache_lock(cache):
        if (cache / "DONE").is_file():
            info = json.loads((cache / "DONE").read_text())
            ref = BoxRefiner.load(cache, device=device)
            ref.set_inference(**{k: v for k, v in options.items() if k in BoxRefiner.INFERENCE_KEYS})
            return ref, {**info, "cached": True, "cache": str(cache)}
        ref = BoxRefiner(device=device, **options)
        t0 = time.perf_counter()
        info = ref.fit(arr.images[tr], arr.boxes[tr], arr.images[va], arr.boxes[va])
        info = {"fit_s": time.perf_counter() - t0, "n_train": int(len(tr)), **info}
        _publish(cache, ref.save, info)
        return ref, {**info, "cached": False, "cache": str(cache)}


def _fit_detector_locked(
    name: str, kwargs: dict[str, Any], arr: ScanArrays, tr: np.ndarray, va: np.ndarray, cache: Path, workdir: Path
) -> tuple[Detector, dict[str, Any]]:
    if (cache / "DONE").is_file():
        det = detector_class(name).load(cache)
        det.set_inference(**{k: v for k, v in kwargs.items() if k in det.INFERENCE_KEYS})
        return det, {**json.loads((cache / "DONE").read_text()), "cached": True, "cache": str(cache)}
    det = build_detector(name, **kwargs)
    t0 = time.perf_counter()
    info = det.fit(arr.subset(tr), arr.subset(va), workdir / "train")
    info = {
        "fit_s": time.perf_counter() - t0,
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "n_train_distended": int(arr.labels[tr].sum()),
        **(info or {}),
    }
    _publish(cache, det.save, info)
    return det, {**info, "cached": False, "cache": str(cache)}


def predict_priors(
    cfg: dict[str, Any], detector: Detector | None, arrays: ScanArrays, policy: PriorPolicy | None, batch_size: int = 16
) -> Priors:
    """Priors for ``arrays``: ground-truth boxes when ``detector`` is None, else the top-1 policy."""
    n, size = len(arrays), arrays.images.shape[-1]
    if detector is None:
        raw = arrays.boxes.astype(np.float32)
        dets = [Detections(b[None], np.ones(1)) for b in raw]
        return Priors(expand_all(raw, cfg, size), raw, ["gt"] * n, np.ones(n, np.float32), dets)
    assert policy is not None
    dets: list[Detections] = []
    for s in range(0, n, batch_size):
        dets.extend(detector.predict(arrays.images[s : s + batch_size]))
    chosen = policy.select_all(dets, size, size)
    raw = np.array([p.box for p in chosen], dtype=np.float32).reshape(n, 4)
    return Priors(
        expand_all(raw, cfg, size),
        raw,
        [p.source for p in chosen],
        np.array([p.score for p in chosen], np.float32),
        dets,
    )


# ----------------------------------------------------------------------------- U-Net


def train_config(cfg: dict[str, Any], mode: str) -> Any:
    from reconstruction.train import TrainConfig
    from reconstruction.unet import UNetConfig

    u = cfg["unet"]
    section = cfg["riad"] if mode == "riad" else u
    w = u["loss_weights"]
    return TrainConfig(
        mode=mode,
        unet=UNetConfig.profile(u["profile"]),
        epochs=int(section["epochs"]),
        patience=int(section["patience"]),
        lr=float(u["lr"]),
        batch_size=int(u["batch_size"]),
        msgms_weight=float(w[0]),
        ssim_weight=float(w[1]),
        l2_weight=float(w[2]),
        mask_margin=float(u["mask_margin"]),
        riad_ks=tuple(int(k) for k in cfg["riad"]["ks"]),
        seed=int(cfg["seed"]),
        device=resolve_device(cfg),
        max_train_seconds=float(section["max_minutes"]) * 60 if section.get("max_minutes") else None,
        progress=bool(cfg.get("progress", True)),
    )


def annotations_fingerprint(root: Path) -> str:
    """A dataset's identity for cache keys and resumes: its annotations. Replacing an image file under
    the same name and annotations is not detected; clear the cache (``cache_dir``) after editing images."""
    return hashlib.sha256((Path(root) / "annotations.json").read_bytes()).hexdigest()[:16]


def unet_cache_dir(
    cfg: dict[str, Any], data: Data, train_ids: tuple[int, ...], val_ids: tuple[int, ...], mode: str
) -> Path:
    """Cache folder keyed by everything a trained U-Net depends on: data, fold, config, seed.

    The training config in the key holds the budget (``epochs``, ``patience``) and the opt-in
    time cap (``max_train_seconds``, None when off), so a U-Net trained under another budget is
    never reused as this one; a killed training resumes from ``<entry>/work`` of the same key."""
    tc = train_config(cfg, mode).to_dict()
    for k in ("progress", "device"):
        tc.pop(k, None)
    key_doc = {
        "data": annotations_fingerprint(data.root),
        "size": cfg["image_size"],
        "train": list(train_ids),
        "val": list(val_ids),
        "train_cfg": tc,
        "expand": [cfg["detector"]["expand_up"], cfg["detector"]["expand_side"]],
        "frame": cfg.get("frame", 0),
        "version": 1,
    }
    return cache_root(cfg) / f"unet-{mode}-{_key(key_doc)}"


def fit_unet(
    cfg: dict[str, Any], data: Data, train_idx: np.ndarray, val_idx: np.ndarray, mode: str = "single"
) -> tuple[Any, dict[str, Any]]:
    """A trained U-Net for this fold: from the cache when present, else trained and cached.

    Trains on normal scans with ground-truth boxes (expanded by the prior policy, so the mask
    geometry matches inference). A killed training resumes from its last checkpoint.
    """
    arr = data.arrays
    tr = arr.labels[train_idx] == 0
    va = arr.labels[val_idx] == 0
    train_idx, val_idx = train_idx[tr], val_idx[va]
    cache = unet_cache_dir(cfg, data, tuple(arr.ids[train_idx].tolist()), tuple(arr.ids[val_idx].tolist()), mode)
    with cache_lock(cache):
        return _fit_unet_locked(cfg, arr, train_idx, val_idx, mode, cache)


def _fit_unet_locked(
    cfg: dict[str, Any], arr: ScanArrays, train_idx: np.ndarray, val_idx: np.ndarray, mode: str, cache: Path
) -> tuple[Any, dict[str, Any]]:
    from reconstruction.checkpoint import load_model, save_model
    from reconstruction.train import train_unet

    if (cache / "DONE").is_file():
        model, meta = load_model(cache, map_location=resolve_device(cfg))
        return model, {**json.loads((cache / "DONE").read_text()), "cached": True, "cache": str(cache)}
    size = arr.images.shape[-1]
    t0 = time.perf_counter()
    res = train_unet(
        arr.subset(train_idx),
        arr.subset(val_idx),
        train_config(cfg, mode),
        workdir=cache / "work",
        train_boxes=expand_all(arr.boxes[train_idx], cfg, size),
        val_boxes=expand_all(arr.boxes[val_idx], cfg, size),
    )
    info = {
        "fit_s": time.perf_counter() - t0,
        "best_epoch": res.best_epoch,
        "best_val_loss": res.best_val_loss,
        "epochs_run": res.epochs_run,
        "stop_reason": res.stop_reason,
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "mode": mode,
    }
    save_model(res.model, cache, meta=info)
    (cache / "history.json").write_text(json.dumps(res.history))
    (cache / "DONE").write_text(json.dumps(info))
    shutil.rmtree(cache / "work", ignore_errors=True)
    return res.model, {**info, "cached": False, "cache": str(cache)}
