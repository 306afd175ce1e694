"""The model cache: where trained models live, their keys, the lock, and the atomic publish.

A trained model (detector, box refiner, U-Net) depends only on the data (the bytes of every image
and the annotations), the fold's image ids, its training settings and the seed, so it is cached
under a key of exactly those, shared by ``run``, ``ablate`` and ``train`` and by concurrent runs
(one trains, the others wait and load). An entry that fails to load is moved aside and retrained.

Under ``torchrun`` (:func:`fit_or_load`) rank 0 alone takes the lock and looks in the cache; every
rank follows its decision, trains with it on a miss, and loads what rank 0 published.

>>> scope = CacheScope(data="d41d8cd98f00b204", size=128, frame=0, train=(1, 2), val=(3,))
>>> scope.entry(Path("/c"), "unet-single", train_cfg={"epochs": 3}).name.startswith("unet-single-")
True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from runtime.device import runtime_info
from runtime.distributed import barrier, broadcast_decision, is_distributed, is_main, rank
from runtime.env import cache_home
from runtime.io import atomic_write_text

DONE = "DONE"
T = TypeVar("T")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where trained models are cached: ``cache_dir``, else ``models/`` under
    :func:`runtime.env.cache_home` (``$LORIS_CACHE``, ``$XDG_CACHE_HOME/loris``, ``~/.cache/loris``)."""
    return Path(cache_dir) if cache_dir else cache_home() / "models"


def digest(doc: dict[str, Any]) -> str:
    """The 20-hex key of a JSON-able document (sorted keys, so insertion order does not matter).

    >>> digest({"b": 1, "a": [2]}) == digest({"a": [2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CacheScope:
    """What every cached model of a fold depends on: the dataset, model size, DICOM frame and ids."""

    data: str  # the dataset's content: every image's bytes and annotations.json (pipeline.shared.data.Data.fingerprint)
    size: int
    frame: int
    train: tuple[int, ...]
    val: tuple[int, ...]

    def entry(self, root: Path, prefix: str, version: int = 1, **specific: Any) -> Path:
        """``root/<prefix>-<key>``: the key holds this scope, ``version`` and the model's own settings."""
        doc = {
            "data": self.data,
            "size": self.size,
            "frame": self.frame,
            "train": list(self.train),
            "val": list(self.val),
            **specific,
            "version": version,
        }
        return Path(root) / f"{prefix}-{digest(doc)}"


@contextlib.contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Exclusive lock on one cache entry, so concurrent runs train it once and share it."""
    from filelock import FileLock  # imported here: it loads the platform's lock module (fcntl on POSIX)

    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.with_name(entry.name + ".lock"))):  # released on exit, also if the process dies
        yield


def cached_info(entry: Path) -> dict[str, Any] | None:
    """The training summary of a finished entry (its ``DONE`` file), or None when not finished."""
    done = entry / DONE
    return json.loads(done.read_text()) if done.is_file() else None


def move_aside(entry: Path, reason: str) -> Path:
    """Rename a broken entry to ``<entry>.broken-<time>`` (kept for inspection), saying so on stderr."""
    aside = entry.with_name(f"{entry.name}.broken-{time.time_ns()}")
    entry.rename(aside)
    print(
        f"warning: cache entry {entry} cannot be loaded ({reason}); moved to {aside.name}; retraining",
        file=sys.stderr,
    )
    return aside


def load_cached(entry: Path, load: Callable[[Path], T]) -> tuple[T, dict[str, Any]] | None:
    """``(load(entry), its DONE summary)`` for a finished entry; None when there is none, or when it
    fails to load: then it is moved aside (:func:`move_aside`) so that the caller retrains it.

    >>> import tempfile
    >>> entry = Path(tempfile.mkdtemp()) / "m-1"
    >>> publish(entry, lambda p: p.mkdir(), {"fit_s": 1.0})
    >>> load_cached(entry, lambda p: "model")
    ('model', {'fit_s': 1.0})
    >>> load_cached(entry, lambda p: (p / "model.pt").read_bytes()) is None  # no model.pt: moved aside
    True
    >>> entry.exists()
    False
    """
    try:
        done = cached_info(entry)
        return None if done is None else (load(entry), done)
    except Exception as exc:  # a loader may raise anything on a truncated or tampered file: retrain instead
        move_aside(entry, f"{type(exc).__name__}: {exc}")
        return None


def publish(entry: Path, save: Callable[[Path], None], info: dict[str, Any]) -> None:
    """Save into a sibling folder, mark it DONE, then rename it into place: atomic, so a
    half-saved model is never taken from the cache."""
    tmp = entry.with_name(entry.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    (tmp / DONE).write_text(json.dumps(info, default=str))
    shutil.rmtree(entry, ignore_errors=True)
    tmp.rename(entry)


def fit_or_load(
    entry: Path,
    load: Callable[[Path], T],
    fit: Callable[[], tuple[T, dict[str, Any]]],
    every_rank: bool = True,
    lock: Callable[[Path], contextlib.AbstractContextManager[None]] | None = None,
) -> tuple[T, dict[str, Any]]:
    """The model of ``entry`` with its summary plus ``cached`` and ``cache``: loaded when finished
    (:func:`load_cached`), else ``fit()``, which trains and, on rank 0 only, publishes ``entry``.

    In one process: under the entry's lock, as before. Under ``torchrun`` (docs/design.md) rank 0
    alone takes the lock (so ranks of one job never wait on each other's lock) and decides hit or
    miss for all (:func:`runtime.distributed.broadcast_decision`): a rank that trained while another
    skipped would wait for it forever. On a miss ``fit`` runs on every rank (``every_rank``: it
    trains with DistributedDataParallel) or on rank 0 alone while the others wait; after a barrier
    the other ranks load the entry rank 0 published, so every rank holds the same model. ``lock``:
    the entry's lock (default :func:`cache_lock`).
    """
    lock = lock or cache_lock
    if not is_distributed():
        with lock(entry):
            hit = load_cached(entry, load)
            model, info = hit if hit is not None else _fit_recorded(entry, fit)
        return model, {"trained_with": None, **info, "cached": hit is not None, "cache": str(entry)}
    with lock(entry) if is_main() else contextlib.nullcontext():
        hit = load_cached(entry, load) if is_main() else None
        cached = broadcast_decision(hit is not None)
        if is_main():
            result = hit if hit is not None else _fit_recorded(entry, fit)
        elif not cached and every_rank:
            fit()  # its collectives pair with rank 0's; the model itself comes from the cache below
        barrier()  # rank 0 has published the entry
        if not is_main():
            result = _load_published(entry, load)
    return result[0], {"trained_with": None, **result[1], "cached": cached, "cache": str(entry)}


def _fit_recorded(entry: Path, fit: Callable[[], tuple[T, dict[str, Any]]]) -> tuple[T, dict[str, Any]]:
    """``fit()``, with how it ran (:func:`runtime.device.runtime_info`: world size, backend, torch threads)
    added to its summary and to the entry's ``DONE``, so a run that reuses the model can say how it was
    trained; the key is unchanged. Entries made before this record say ``trained_with: null``."""
    trained_with = runtime_info()
    model, info = fit()
    info = {**info, "trained_with": trained_with}
    done = entry / DONE
    if is_main() and done.is_file():
        atomic_write_text(done, json.dumps({**json.loads(done.read_text()), "trained_with": trained_with}, default=str))
    return model, info


def _load_published(entry: Path, load: Callable[[Path], T]) -> tuple[T, dict[str, Any]]:
    """What rank 0 just published (or found) at ``entry``; a rank never moves it aside."""
    info = cached_info(entry)
    if info is None:
        raise RuntimeError(f"rank {rank()}: {entry} holds no finished model after rank 0 published it")
    return load(entry), info
