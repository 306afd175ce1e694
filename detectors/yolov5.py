"""YOLOv5u recess detector through ultralytics, trained from scratch and fully offline.

ultralytics builds ``yolov5n.yaml`` / ``yolov5s.yaml`` as *YOLOv5u*: the YOLOv5 backbone and
neck with the anchor-free, decoupled YOLOv8 head (not the anchor-based head of the paper's
YOLOv5 v6.1). No pretrained weights are used: the model is built from the yaml.

Pipeline use::

    det = build_detector("yolov5", **cfg)           # cfg = configs/detectors/yolov5.yaml
    summary = det.fit(train_arrays, val_arrays, workdir)
    dets = det.predict(test_arrays.images)          # list[Detections], best first
    det.save(folder); det = YoloV5Detector.load(folder)

Offline and side-effect rules (ultralytics otherwise reaches for the network and the process):

* ``YOLO_OFFLINE=1`` is set before ultralytics is first imported (it DNS-probes on import).
* ultralytics' settings and font live in one fixed folder, :func:`ultralytics_home`
  (``<LoRIS cache>/ultralytics``, see :func:`runtime.env.cache_home`), created once and reused
  by every process: ``YOLO_CONFIG_DIR`` points there before the first import, which holds a file
  lock so concurrent processes never tear ``settings.json``. matplotlib's DejaVuSans.ttf is copied
  there once as ``Ultralytics/Arial.ttf``, because ultralytics downloads Arial.ttf even when
  offline. ``MPLCONFIGDIR`` and ``TORCHINDUCTOR_CACHE_DIR`` default to ``<LoRIS cache>/matplotlib``
  and ``<LoRIS cache>/torchinductor`` (matplotlib's font manager, which ultralytics imports, and
  torch's optimizers write there). Nothing goes to the temp dir or HOME.
* ``amp=False`` (its AMP check downloads weights), ``plots=False``, settings ``sync`` and
  integrations off.
* ultralytics sets ``OMP_NUM_THREADS=1`` on import, forces torch to ``cpu_count - 1`` threads
  and switches deterministic algorithms on globally; :meth:`fit` restores all three afterwards.

Saved form (no pickles): ``weights.pt`` is a plain ``state_dict`` written by ``torch.save`` and
read with ``weights_only=True``; ``detector.json`` holds the model yaml (as a dict) and config.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import torch
import yaml
from filelock import FileLock

from detectors.base import Detections, Detector, register
from detectors.fusion import fuse_top
from detectors.yolo_format import to_uint8, write_dataset
from runtime.env import cache_home
from runtime.io import CheckpointError, atomic_write, atomic_write_text, load_meta, load_state
from runtime.training import seeded_global_rng
from scans.records import ScanArrays

_SETTINGS_LOCK = "settings.json.lock"
_INTEGRATIONS_OFF = dict.fromkeys(
    ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb", "hub"), False
)


def ultralytics_home(cache_dir: Path | str | None = None) -> Path:
    """ultralytics' settings folder (``YOLO_CONFIG_DIR``): ``ultralytics/`` under :func:`runtime.env.cache_home`.

    >>> ultralytics_home("/c").as_posix()
    '/c/ultralytics'
    """
    return cache_home(cache_dir) / "ultralytics"


def _dejavu_font() -> Path:
    """matplotlib's bundled DejaVuSans.ttf, found without importing matplotlib (its import writes a cache)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise RuntimeError("matplotlib is not installed: ultralytics needs its DejaVuSans.ttf as a local font")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"


def _ensure_font(user_config_dir: Path) -> None:
    """Put a local font where ultralytics looks for Arial.ttf, so it never downloads one (copied once)."""
    target = Path(user_config_dir) / "Arial.ttf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda p: shutil.copyfile(_dejavu_font(), p))


def _default_cache_env(variable: str, folder: str) -> None:
    """Point ``variable`` at ``<LoRIS cache>/<folder>`` unless the user set it."""
    if os.environ.get(variable):
        return
    path = cache_home() / folder
    with contextlib.suppress(OSError):
        path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(path)


def _first_import(config_dir: Path) -> None:
    """Import ultralytics with its settings under ``config_dir``, offline, holding a lock in that folder
    (ultralytics rewrites ``settings.json`` in place on first use, which a concurrent reader could see torn)."""
    config_dir = Path(config_dir).resolve()
    os.environ["YOLO_OFFLINE"] = "1"  # before import: the import itself probes DNS otherwise
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    if "matplotlib" not in sys.modules:  # ultralytics imports matplotlib's font manager, which writes a cache
        _default_cache_env("MPLCONFIGDIR", "matplotlib")
    _default_cache_env("TORCHINDUCTOR_CACHE_DIR", "torchinductor")  # torch's first optimizer step makes it in TMPDIR
    omp = os.environ.get("OMP_NUM_THREADS")
    user_dir = config_dir / "Ultralytics"  # ultralytics' USER_CONFIG_DIR under YOLO_CONFIG_DIR
    try:
        user_dir.mkdir(parents=True, exist_ok=True)
        lock: contextlib.AbstractContextManager[Any] = FileLock(str(user_dir / _SETTINGS_LOCK))
    except OSError:  # a read-only cache: ultralytics falls back to its own fixed folder
        lock = contextlib.nullcontext()
    with lock:
        import ultralytics  # noqa: F401
        from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

        _ensure_font(USER_CONFIG_DIR)
        _integrations_off(SETTINGS)
    if omp is None:  # ultralytics sets it to 1 for the whole process (and its subprocesses)
        os.environ.pop("OMP_NUM_THREADS", None)


def _integrations_off(settings: Any) -> None:
    wanted = {k: v for k, v in _INTEGRATIONS_OFF.items() if k in settings and settings[k] != v}
    if wanted:
        settings.update(wanted)


def import_ultralytics(config_dir: Path | str | None = None) -> ModuleType:
    """Import ultralytics offline, with its settings and font under ``config_dir`` (default
    :func:`ultralytics_home`). Only the first import in a process picks the folder; every call makes
    sure the font is present and sync/integrations are off."""
    if "ultralytics" not in sys.modules:
        _first_import(Path(config_dir) if config_dir is not None else ultralytics_home())
    import ultralytics
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    _ensure_font(USER_CONFIG_DIR)
    if any(k in SETTINGS and SETTINGS[k] != v for k, v in _INTEGRATIONS_OFF.items()):
        with FileLock(str(Path(USER_CONFIG_DIR) / _SETTINGS_LOCK)):
            _integrations_off(SETTINGS)
    return ultralytics


def _build_model(model_yaml: dict[str, Any]) -> torch.nn.Module:
    """A fresh one-class DetectionModel from a yaml dict (random weights, eval mode)."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(cfg=json.loads(json.dumps(model_yaml)), ch=3, nc=1, verbose=False)
    return model.eval()


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``[N, S, S]`` to ``size`` with the interpolation ultralytics' loader uses."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    interp = cv2.INTER_AREA if size < images.shape[1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(im, (size, size), interpolation=interp) for im in images])


# Every config key with its default; configs/detectors/yolov5.yaml documents the chosen values.
DEFAULTS: dict[str, Any] = dict(
    model="yolov5n.yaml",
    imgsz=256,
    epochs=30,
    batch=16,
    lr0=0.01,
    lrf=0.01,
    optimizer="SGD",
    patience=100,
    warmup_epochs=3.0,
    cos_lr=False,
    hsv_v=0.4,
    translate=0.1,
    scale=0.5,
    fliplr=0.5,
    mosaic=1.0,
    close_mosaic=10,
    degrees=0.0,
    conf=0.001,
    iou=0.6,
    max_det=10,
    tta_flip=False,
    fuse_iou=None,
    predict_batch=32,
    workers=0,
    threads=None,
    seed=0,
    val_every_epoch=True,
    deterministic=True,
    device="cpu",
    train_args={},
)


# DEFAULTS keys ultralytics' trainer takes unchanged.
_SCHEDULE_KEYS = ("epochs", "imgsz", "batch", "lr0", "lrf", "optimizer", "patience", "warmup_epochs", "cos_lr")
_AUGMENT_KEYS = ("hsv_v", "translate", "scale", "fliplr", "mosaic", "close_mosaic", "degrees")


def load_config(config_file: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """DEFAULTS, updated by the yaml ``config_file``, updated by ``overrides``; unknown keys raise."""
    cfg = dict(DEFAULTS)
    sources: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        sources.append((str(config_file), yaml.safe_load(Path(config_file).read_text()) or {}))
    sources.append(("arguments", overrides))
    for where, values in sources:
        unknown = sorted(set(values) - set(DEFAULTS) - {"name"})
        if unknown:
            raise ValueError(f"unknown yolov5 config keys in {where}: {unknown}; known: {sorted(DEFAULTS)}")
        cfg.update({k: v for k, v in values.items() if k != "name"})
    if int(cfg["imgsz"]) % 32:
        raise ValueError(f"imgsz must be a multiple of 32 (the network stride), got {cfg['imgsz']}")
    cfg["train_args"] = dict(cfg["train_args"] or {})
    return cfg


def _ultralytics_device(device: str) -> str:
    """torch-style ``cpu`` / ``cuda`` / ``cuda:1`` / ``cuda:0,1`` to ultralytics' ``cpu`` / ``0`` / ``1`` /
    ``0,1`` (a list trains on those GPUs with ultralytics' own multi-GPU DDP launcher).

    >>> [_ultralytics_device(d) for d in ("cpu", "cuda", "cuda:1", "cuda:0,1", "0,1", "cuda:0,cuda:1")]
    ['cpu', '0', '1', '0,1', '0,1', '0,1']
    """
    device = str(device).strip()
    if device == "cpu":
        return device
    parts = [p.strip().removeprefix("cuda").lstrip(":") for p in device.split(",")]
    parts = [p or "0" for p in parts]
    if not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"device must be cpu, cuda, cuda:N or a list of distinct GPUs like cuda:0,1; got {device!r}")
    return ",".join(parts)


@register("yolov5", display="YOLOv5u", paper_row="yolov5u")
class YoloV5Detector(Detector):
    """YOLOv5u (ultralytics) trained from scratch on the caller's scans.

    Built as ``YoloV5Detector(config_file=None, **config)``: the keys of :data:`DEFAULTS`,
    read from ``config_file`` (yaml) and overridden by keyword arguments (the pipeline passes
    ``seed`` and ``device`` this way). The keys:

    * ``model``: ultralytics model yaml, ``yolov5n.yaml`` or ``yolov5s.yaml``.
    * ``imgsz``: training and inference size (multiple of 32); images are resized to it.
    * ``epochs, batch, lr0, lrf, optimizer, patience, warmup_epochs, cos_lr``: ultralytics training keys.
    * ``hsv_v, translate, scale, fliplr, mosaic, close_mosaic, degrees``: augmentation keys.
    * ``conf``: minimum confidence :meth:`predict` returns (the prior's threshold is
      :class:`detectors.prior.PriorPolicy`'s; keep this low so mAP sees the full ranking).
    * ``iou``: NMS IoU threshold; ``max_det``: detections kept per image.
    * ``tta_flip``: also run the left-right flipped image and pool both passes' candidates.
    * ``fuse_iou``: replace the best box by the score-weighted mean of the raw candidates with
      IoU >= this with it (:func:`detectors.fusion.fuse_top`); ``None`` keeps plain NMS.
    * ``predict_batch``: images per forward pass in :meth:`predict`.
    * ``workers``: dataloader processes (0 = in the main process).
    * ``threads``: torch threads while training (None = the caller's setting, not ultralytics' cpu-1).
    * ``seed, deterministic``: reproducibility; ``device``: ``cpu``, ``cuda``, ``cuda:N``, or a GPU list
      (``cuda:0,1`` or ``0,1``) for ultralytics' multi-GPU training (prediction uses the first GPU).
    * ``train_args``: further ultralytics train keys, passed through unchanged.
    """

    # Read by predict() alone (ultralytics' trainer never sees them).
    INFERENCE_KEYS = frozenset({"conf", "iou", "max_det", "tta_flip", "fuse_iou", "predict_batch"})

    def __init__(self, config_file: str | Path | None = None, **config: Any) -> None:
        self.config: dict[str, Any] = load_config(config_file, **config)
        self.model_yaml: dict[str, Any] | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._model: torch.nn.Module | None = None

    # ----------------------------------------------------------------------------------------- fit
    def _train_args(self, data: Path, workdir: Path) -> dict[str, Any]:
        c = self.config
        # The config's own keys, then those an offline, reproducible, plot-free CPU run needs.
        args: dict[str, Any] = {"data": str(data), **{k: c[k] for k in _SCHEDULE_KEYS}}
        args.update(hsv_h=0.0, hsv_s=0.0)  # grayscale: hue/saturation jitter means nothing
        args.update({k: c[k] for k in _AUGMENT_KEYS})
        args.update(workers=c["workers"], seed=c["seed"], deterministic=c["deterministic"])
        args.update(device=_ultralytics_device(c["device"]), project=str(workdir), name="train", exist_ok=True)
        args.update(pretrained=False, amp=False, plots=False, single_cls=True, verbose=False, save=True)
        args.update(val=bool(c["val_every_epoch"]), cache=False)
        args.update(c["train_args"])
        return args

    def fit(self, train: ScanArrays, val: ScanArrays, workdir: Path) -> dict[str, Any]:
        """Convert to YOLO format under ``workdir``, train, keep the best-validation weights (the last
        epoch's when ``val_every_epoch`` is off: ultralytics then validates only after it)."""
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if len(train) == 0:
            raise ValueError("no training scans for the detector")
        if len(val) == 0:
            raise ValueError("no validation scans for the detector (ultralytics validates every epoch)")
        if train.images.shape[1] != train.images.shape[2]:
            raise ValueError("detector images must be square [N, S, S]")
        import_ultralytics()
        from ultralytics import YOLO
        from ultralytics.utils import LOGGER

        data = write_dataset(train, val, workdir / "yolo_data")
        threads_before = torch.get_num_threads()
        det_before = torch.are_deterministic_algorithms_enabled()
        threads = self.config["threads"] or threads_before
        handler = logging.FileHandler(workdir / "train.log")  # ultralytics logs to stdout only
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        LOGGER.addHandler(handler)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yolo = YOLO(self.config["model"], task="detect")
            # ultralytics' select_device forces cpu_count-1 threads (1 on 2 cores) after setup.
            yolo.add_callback("on_pretrain_routine_end", lambda trainer: torch.set_num_threads(threads))
            yolo.train(**self._train_args(data, workdir))
            trainer: Any = yolo.trainer
            # YOLO.train reloads best.pt (written by this run moments ago) into yolo.model.
            trained: Any = yolo.model
            state = {
                k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in trained.state_dict().items()
            }
            model_yaml = dict(trained.yaml)
        finally:
            LOGGER.removeHandler(handler)
            handler.close()
            torch.set_num_threads(threads_before)
            torch.use_deterministic_algorithms(det_before)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        self._set_weights(model_yaml, state)
        return {
            "detector": "yolov5",
            "architecture": "YOLOv5u",
            "model": self.config["model"],
            "train_images": len(train),
            "val_images": len(val),
            "epochs_run": int(trainer.epoch) + 1,
            "best_fitness": float(trainer.best_fitness) if trainer.best_fitness is not None else None,
            "train_seconds": round(seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1),
            "threads": threads,
            "run_dir": str(trainer.save_dir),
        }

    def init_untrained(self) -> YoloV5Detector:
        """Random weights of the configured architecture: for throughput benchmarks only."""
        from ultralytics.nn.tasks import yaml_model_load

        import_ultralytics()
        model_yaml = dict(yaml_model_load(self.config["model"]))
        with seeded_global_rng(int(self.config["seed"])):
            state = _build_model(model_yaml).state_dict()
        self._set_weights(model_yaml, state)
        return self

    def _set_weights(self, model_yaml: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        """Rebuild the network from its yaml and weights: the one path used after fit() and load()."""
        model: Any = _build_model(model_yaml)  # an ultralytics DetectionModel (it has fuse())
        model.load_state_dict(state)
        self.model_yaml, self._state = model_yaml, state  # the unfused weights are what save() writes
        # Fusing conv+BN changes only rounding and is faster; done identically after fit() and load().
        self._model = model.fuse(verbose=False).eval().to(self._torch_device)

    @property
    def _torch_device(self) -> torch.device:
        first = _ultralytics_device(self.config["device"]).split(",")[0]  # predict runs on one device
        return torch.device("cpu" if first == "cpu" else f"cuda:{first}")

    # ------------------------------------------------------------------------------------- predict
    def predict(self, images: np.ndarray) -> list[Detections]:
        """Detections (x1, y1, x2, y2 in input pixels, best first) for ``[N, S, S]`` images in [0, 1]."""
        if self._model is None:
            raise RuntimeError("YoloV5Detector is not trained: call fit() or load()")
        from ultralytics.utils.nms import non_max_suppression

        images = np.asarray(images)
        if images.ndim != 3:
            raise ValueError(f"images must be [N, S, S], got shape {images.shape}")
        n, h, w = images.shape
        size = int(self.config["imgsz"])
        # Quantise like the training PNGs, so train and inference inputs match bit for bit.
        u8 = _resize_batch(to_uint8(images), size)
        sx, sy = w / size, h / size
        out: list[Detections] = []
        bs = max(1, int(self.config["predict_batch"]))
        fuse_iou = self.config["fuse_iou"]
        with torch.inference_mode():
            for s in range(0, n, bs):
                x = torch.from_numpy(u8[s : s + bs]).float().div_(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()
                raw = self._raw(x.to(self._torch_device))
                preds = non_max_suppression(
                    raw,
                    conf_thres=float(self.config["conf"]),
                    iou_thres=float(self.config["iou"]),
                    max_det=int(self.config["max_det"]),
                )
                for p, r in zip(preds, raw):
                    p = p.cpu().numpy()
                    if fuse_iou is not None and len(p):
                        # Fuse over every raw candidate above a floor: weights are scores, so the
                        # floor only drops the thousands of near-zero anchors.
                        r = r.cpu().numpy()
                        keep = r[4] >= max(float(self.config["conf"]), 0.01)
                        if keep.any():
                            xywh = r[:4, keep].T
                            cand = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
                            p[0, :4] = fuse_top(cand, r[4, keep], float(fuse_iou))
                    boxes = p[:, :4] * np.array([sx, sy, sx, sy], dtype=np.float32)
                    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
                    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
                    out.append(Detections(boxes, p[:, 4]))
        return out

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-NMS candidates ``[N, 5, A]`` (cx, cy, w, h, score), with the flipped pass appended."""

        model = self._model
        if model is None:
            raise RuntimeError("YoloV5Detector is not trained: call fit() or load()")

        def forward(inp: torch.Tensor) -> torch.Tensor:
            y = model(inp)
            return y[0] if isinstance(y, (list, tuple)) else y  # eval mode may also return features

        out = forward(x)
        if not self.config["tta_flip"]:
            return out
        flipped = forward(x.flip(-1)).clone()
        flipped[:, 0] = x.shape[-1] - flipped[:, 0]  # mirror the centre; width and height are unchanged
        return torch.cat([out, flipped], dim=2)

    # ------------------------------------------------------------------------------------ save/load
    def save(self, directory: Path) -> None:
        if self._model is None or self.model_yaml is None:
            raise RuntimeError("nothing to save: the detector is not trained")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self._state
        atomic_write(directory / "weights.pt", lambda p: torch.save(state, p))
        meta = {"detector": "yolov5", "architecture": "YOLOv5u", "config": self.config, "model_yaml": self.model_yaml}
        atomic_write_text(directory / "detector.json", json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path, hint: str | None = None) -> YoloV5Detector:
        """The detector saved by :meth:`save`; a missing, corrupt or tampered file raises
        :class:`runtime.io.CheckpointError` naming it (``hint``: the fix its message suggests)."""
        directory = Path(directory)
        meta = load_meta(directory / "detector.json", hint=hint)
        if meta.get("detector") != "yolov5":
            raise ValueError(f"{directory} does not hold a saved yolov5 detector")
        import_ultralytics()
        try:
            config = dict(meta["config"])
            model_yaml = dict(meta["model_yaml"])
            if str(config["device"]) != "cpu" and not torch.cuda.is_available():
                config["device"] = "cpu"  # trained on a GPU, used on a CPU machine
            det = cls(**config)
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"is not a saved yolov5 config ({type(exc).__name__}: {exc})"
            raise CheckpointError.about(directory / "detector.json", problem, hint) from None
        state = load_state(directory / "weights.pt", map_location="cpu", hint=hint)
        try:
            det._set_weights(model_yaml, state)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError.about(directory / "weights.pt", f"does not fit the model ({detail})", hint) from None
        return det
