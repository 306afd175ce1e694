"""Patient-grouped, label-stratified k-fold splits with a patient-grouped validation part.

Each fold's test part is one group fold of ``StratifiedGroupKFold``; the validation part is a
patient-grouped, stratified ~``val_fraction`` of the rest; train is the remainder. No patient
appears in two parts of one fold, and the split is a pure function of (scans, k, seed).

>>> from scans.records import Scan
>>> from pathlib import Path
>>> scans = [Scan(i, Path(f"{i}.png"), f"p{i // 4}", int(i % 5 == 0), None, 8, 8) for i in range(80)]
>>> folds = make_folds(scans, k=5, seed=0)
>>> len(folds), sorted(set(folds[0].train) | set(folds[0].val) | set(folds[0].test)) == list(range(80))
(5, True)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from runtime.io import atomic_write_text
from scans.records import Scan


@dataclass(frozen=True)
class Fold:
    """Scan ids of one fold's train, validation and test parts."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


def _group_split(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    """Index arrays of each group fold; falls back to fewer splits when groups are scarce."""
    n_groups = len(np.unique(groups))
    n_splits = max(2, min(n_splits, n_groups))
    # Stratification needs each class in every split; with tiny data sklearn only warns.
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [test for _, test in sgkf.split(np.zeros(len(labels)), labels, groups)]


def make_folds(scans: Sequence[Scan], k: int = 5, seed: int = 0, val_fraction: float = 0.2) -> list[Fold]:
    """Patient-grouped, label-stratified folds (see module docstring)."""
    if k < 2:
        raise ValueError("k must be at least 2")
    ids = np.array([s.id for s in scans])
    labels = np.array([s.label for s in scans])
    groups = np.array([s.patient for s in scans])
    if len(np.unique(groups)) < k + 1:
        raise ValueError(
            f"{len(np.unique(groups))} patients cannot make {k} patient-grouped folds with a validation part"
        )
    folds = []
    for f, test_idx in enumerate(_group_split(labels, groups, k, seed)):
        rest = np.setdiff1d(np.arange(len(ids)), test_idx)
        n_val_splits = max(2, int(round(1.0 / val_fraction)))
        val_rel = _group_split(labels[rest], groups[rest], n_val_splits, seed + 1000 + f)[0]
        val_idx = rest[val_rel]
        train_idx = np.setdiff1d(rest, val_idx)
        folds.append(
            Fold(
                tuple(sorted(ids[train_idx].tolist())),
                tuple(sorted(ids[val_idx].tolist())),
                tuple(sorted(ids[test_idx].tolist())),
            )
        )
    return folds


def save_splits(path: Path | str, folds: Sequence[Fold]) -> None:
    atomic_write_text(Path(path), json.dumps([f.to_json() for f in folds], indent=1))


def load_splits(path: Path | str, scans: Sequence[Scan] | None = None) -> list[Fold]:
    """Read ``splits.json``; with ``scans``, check every id exists and no patient leaks."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        folds = [
            Fold(tuple(int(i) for i in f["train"]), tuple(int(i) for i in f["val"]), tuple(int(i) for i in f["test"]))
            for f in raw
        ]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid splits file ({exc.__class__.__name__}: {exc})") from exc
    if scans is not None:
        problems = check_folds(folds, scans)
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
    return folds


def check_folds(folds: Sequence[Fold], scans: Sequence[Scan]) -> list[str]:
    """Problems with a split: unknown ids, overlapping parts, patients in two parts."""
    by_id = {s.id: s for s in scans}
    problems = []
    for f, fold in enumerate(folds):
        parts = {"train": fold.train, "val": fold.val, "test": fold.test}
        for name, part in parts.items():
            unknown = [i for i in part if i not in by_id]
            if unknown:
                problems.append(f"fold {f} {name}: unknown image ids {unknown[:5]}")
        patients = {name: {by_id[i].patient for i in part if i in by_id} for name, part in parts.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            leak = patients[a] & patients[b]
            if leak:
                problems.append(f"fold {f}: patients {sorted(leak)[:5]} are in both {a} and {b}")
    return problems


def resolve_folds(root: Path | str, scans: Sequence[Scan], k: int = 5, seed: int = 0) -> tuple[list[Fold], str]:
    """Folds from ``root/splits.json`` when present, else computed. Returns (folds, source)."""
    path = Path(root) / "splits.json"
    if path.is_file():
        return load_splits(path, scans), str(path)
    return make_folds(scans, k=k, seed=seed), f"computed (k={k}, seed={seed})"
