"""Resolving the dataset of a run: the user's folder, or the embedded phantom."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scans.dataset import load_dataset, to_arrays
from scans.folds import Fold, resolve_folds
from scans.records import Scan, ScanArrays


@dataclass
class Data:
    root: Path
    scans: list[Scan]
    arrays: ScanArrays
    folds: list[Fold]
    folds_source: str

    def index(self, ids: tuple[int, ...] | list[int]) -> np.ndarray:
        pos = {int(i): n for n, i in enumerate(self.arrays.ids)}
        return np.array([pos[int(i)] for i in ids], dtype=np.int64)


def _dataset_folder(path: str | Path) -> Path:
    root = Path(path)
    if not (root / "annotations.json").is_file():
        raise FileNotFoundError(f"{root}: not a LoRIS dataset (no annotations.json); see README 'Your own data'")
    return root


def dataset_root(cfg: dict[str, Any]) -> Path:
    if cfg.get("data"):
        return _dataset_folder(cfg["data"])
    from scans.phantom import default_dataset

    ph = cfg["phantom"]
    return default_dataset(
        n_images=ph["images"],
        n_distended=ph["distended"],
        n_patients=ph["patients"],
        size=ph["size"],
        seed=cfg["seed"],
        progress=cfg.get("progress", True),
    )


def _with_boxes(root: Path) -> list[Scan]:
    """The dataset's scans; every one must carry its recess box (the ground-truth prior)."""
    scans = load_dataset(root)
    missing = [s.path.name for s in scans if s.box is None]
    if missing:
        raise ValueError(
            f"{root}: {len(missing)} image(s) have no recess box (e.g. {missing[:3]}); "
            f"run `python -m scans check {root}`"
        )
    return scans


def load_data(cfg: dict[str, Any]) -> Data:
    root = dataset_root(cfg)
    scans = _with_boxes(root)
    arrays = to_arrays(scans, size=cfg["image_size"], frame=cfg.get("frame", 0))
    folds, source = resolve_folds(root, scans, k=cfg["folds"], seed=cfg["seed"])
    return Data(root, scans, arrays, folds, source)


def external_paths(cfg: dict[str, Any]) -> list[str]:
    """The held-out sets named by ``evaluation.external``: null, one folder, or a list of folders."""
    value = cfg["evaluation"].get("external")
    if not value:
        return []
    paths = [value] if isinstance(value, (str, Path)) else list(value)
    if not all(isinstance(p, (str, Path)) and str(p) for p in paths):
        raise ValueError(f"evaluation.external must be a folder or a list of folders, got {value!r}")
    return [str(p) for p in paths]


def load_externals(cfg: dict[str, Any], data: Data) -> list[ScanArrays]:
    """Every held-out set of ``evaluation.external``, in order (see :func:`load_external`)."""
    sets = [load_external(cfg, data, p) for p in external_paths(cfg)]
    return [s for s in sets if s is not None]


def load_external(cfg: dict[str, Any], data: Data, path: str | None = None) -> ScanArrays | None:
    """A held-out test set (``path``, default the first of ``evaluation.external``; None when unset), as
    model-size arrays.

    It must be a LoRIS dataset with a box on every scan and both classes, and not the run's own data.
    """
    if path is None:
        paths = external_paths(cfg)
        path = paths[0] if paths else None
    if not path:
        return None
    root = _dataset_folder(path)
    if root.resolve() == data.root.resolve():
        raise ValueError(f"{root}: the external test set is the run's own dataset; name a held-out folder")
    scans = _with_boxes(root)
    unlabelled = [s.path.name for s in scans if s.label not in (0, 1)]
    if unlabelled:
        raise ValueError(f"{root}: {len(unlabelled)} image(s) have no normal/distended label (e.g. {unlabelled[:3]})")
    labels = {s.label for s in scans}
    if labels != {0, 1}:
        raise ValueError(
            f"{root}: the external test set needs normal and distended scans, it holds only "
            f"{'distended' if labels == {1} else 'normal'} ones"
        )
    arrays = to_arrays(scans, size=cfg["image_size"], frame=cfg.get("frame", 0))
    # A copy of the run's data (or the same phantom generated elsewhere) passes the path check:
    # compare the images themselves, as the models see them.
    seen = {hashlib.sha256(im.tobytes()).digest() for im in data.arrays.images}
    shared = [s.path.name for s, im in zip(scans, arrays.images) if hashlib.sha256(im.tobytes()).digest() in seen]
    if shared:
        raise ValueError(
            f"{root}: {len(shared)} of its {len(scans)} images are also in the run's dataset "
            f"(e.g. {shared[:3]}); an external test set must be held out from training"
        )
    return arrays
