"""Resolving the dataset of a run: the user's folder, or the embedded phantom."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config, PhantomConfig
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

    @functools.cached_property
    def fingerprint(self) -> str:
        """The dataset's content (every image's bytes and ``annotations.json``): cache keys and resumes."""
        return fingerprint(self.root, self.scans)


def fingerprint(root: Path, scans: list[Scan]) -> str:
    """:func:`scans.fingerprint.dataset_fingerprint` of the folder ``root`` holding ``scans``."""
    from scans.fingerprint import dataset_fingerprint

    return dataset_fingerprint(root, [s.path for s in scans])


def external_fingerprint(path: str | Path) -> str:
    """The content fingerprint of the held-out dataset folder ``path``."""
    return fingerprint(Path(path), load_dataset(Path(path)))


class DataError(ValueError):
    """The dataset fails :func:`scans.check.check_dataset`; the message lists every problem."""


def validate(root: Path) -> None:
    """Refuse a dataset with any problem ``python -m scans check`` reports (boxes, ids, types, paths,
    splits), listing them all, before anything is trained on it."""
    from scans.check import check_dataset

    problems = check_dataset(root)
    if problems:
        listing = "\n".join(f"  {p}" for p in problems)
        raise DataError(
            f"{root}: the dataset has {len(problems)} problem(s); nothing was trained "
            f"(fix them; `python -m scans check {root}` lists them again):\n{listing}"
        )


def _dataset_folder(path: str | Path) -> Path:
    root = Path(os.path.abspath(path))  # a relative --data means the folder under the working directory
    if not (root / "annotations.json").is_file():
        raise FileNotFoundError(f"{root}: not a LoRIS dataset (no annotations.json); see README 'Your own data'")
    validate(root)
    return root


def dataset_root(data: str | None, phantom: PhantomConfig, seed: int, progress: bool = True) -> Path:
    """The dataset folder ``data``, else the embedded phantom of ``phantom``'s composition (cached);
    either is validated (:func:`validate`)."""
    if data:
        return _dataset_folder(data)
    from scans.phantom import default_dataset

    root = default_dataset(
        n_images=phantom.images,
        n_distended=phantom.distended,
        n_patients=phantom.patients,
        size=phantom.size,
        seed=seed,
        progress=progress,
        appearance=phantom.appearance,
    )
    validate(root)  # a cached phantom is a folder like any other: it may have been edited
    return root


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


def load_data(cfg: Config) -> Data:
    """The run's dataset at model size, with its folds (``splits.json``, else patient-grouped ``folds``)."""
    root = dataset_root(cfg.data, cfg.phantom, cfg.seed, cfg.progress)
    scans = _with_boxes(root)
    arrays = to_arrays(scans, size=cfg.image_size, frame=cfg.frame)
    folds, source = resolve_folds(root, scans, k=cfg.folds, seed=cfg.seed)
    return Data(root, scans, arrays, folds, source)


def load_externals(paths: list[str], data: Data, size: int, frame: int) -> list[ScanArrays]:
    """Every held-out set of ``paths`` (``evaluation.external``), in order (see :func:`load_external`)."""
    return [load_external(p, data, size, frame) for p in paths]


def load_external(path: str | Path, data: Data, size: int, frame: int) -> ScanArrays:
    """A held-out test set as model-size arrays (``size`` px, DICOM ``frame``).

    It must be a LoRIS dataset with a box on every scan and both classes, and not the run's own data.
    """
    root = _dataset_folder(path)
    if root.resolve() == data.root.resolve():
        raise ValueError(f"{root}: the external test set is the run's own dataset; name a held-out folder")
    scans = _with_boxes(root)
    _check_labels(root, scans)
    arrays = to_arrays(scans, size=size, frame=frame)
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


def _check_labels(root: Path, scans: list[Scan]) -> None:
    unlabelled = [s.path.name for s in scans if s.label not in (0, 1)]
    if unlabelled:
        raise ValueError(f"{root}: {len(unlabelled)} image(s) have no normal/distended label (e.g. {unlabelled[:3]})")
    labels = {s.label for s in scans}
    if labels != {0, 1}:
        raise ValueError(
            f"{root}: the external test set needs normal and distended scans, it holds only "
            f"{'distended' if labels == {1} else 'normal'} ones"
        )
