"""``compare``'s peers (:mod:`reconstruction.peers`): fitted per fold on the fold's training scans with their
budget, and cached like the U-Nets (:func:`fit_peer`; trained once, shared by concurrent runs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.experiment.fold import FoldTask
from pipeline.shared.cache import cache_lock, cache_root, load_cached, publish
from pipeline.shared.models import scope
from reconstruction.peers import Budget, Peer, build_peer, load_peer, peer_spec
from runtime.device import resolve_device
from runtime.timing import Stopwatch
from scans.records import ScanArrays


def peer_indices(arrays: ScanArrays, index: np.ndarray, supervised: bool) -> np.ndarray:
    """The scans a peer may train on: normal ones only, unless it is supervised (both classes)."""
    return index if supervised else index[arrays.labels[index] == 0]


def resolved_budget(peer: Peer, budget: str | Budget, image_size: int) -> Budget:
    """``peer``'s budget; a work size at or above the data's size runs at the data's size.

    >>> resolved_budget(build_peer("uae"), Budget(epochs=1, work_size=128), 64).work_size is None
    True
    """
    b = peer.budget(budget)
    return replace(b, work_size=None) if b.work_size is not None and b.work_size >= image_size else b


@dataclass(frozen=True)
class PeerJob:
    """A peer about to be fitted on one fold: the fresh peer, its budget, its cache entry and scans."""

    peer: Peer
    budget: Budget
    entry: Path
    train: np.ndarray
    val: np.ndarray


def peer_job(
    cfg: Config,
    task: FoldTask,
    name: str,
    budget: str | Budget,
    options: Mapping[str, Any] | None = None,
) -> PeerJob:
    """The peer ``name`` of ``task``'s fold and its cache entry, keyed by the fold's scans, the peer, its
    options resolved over its defaults, the budget and the seed."""
    spec, arr = peer_spec(name), task.data.arrays
    tr, va = (peer_indices(arr, i, spec.supervised) for i in (task.train, task.val))
    peer = build_peer(spec.name, seed=cfg.seed, device=resolve_device(cfg.device), **dict(options or {}))
    b = resolved_budget(peer, budget, cfg.image_size)
    where = scope(task.data, cfg.image_size, cfg.frame, tr, va)
    entry = where.entry(
        cache_root(cfg.cache_dir),
        f"peer-{spec.name}",
        peer=spec.name,
        options=peer.options,
        budget=b.to_dict(),
        seed=cfg.seed,
    )
    return PeerJob(peer, b, entry, tr, va)


def fit_peer(job: PeerJob, arrays: ScanArrays) -> tuple[Peer, dict[str, Any]]:
    """The job's peer trained on its scans, or the cached one (trained once, shared by concurrent runs)."""
    with cache_lock(job.entry):
        hit = load_cached(job.entry, lambda e: load_peer(e, str(job.peer.device)))
        if hit is not None:
            return hit[0], {**hit[1], "cached": True, "cache": str(job.entry)}
        peer, watch = job.peer, Stopwatch()
        with watch("fit"):
            val = arrays.subset(job.val) if len(job.val) else None
            record = peer.fit(arrays.subset(job.train), val, job.budget)
        info = {
            "fit_s": watch.seconds["fit"],
            "n_train": int(len(job.train)),
            "n_val": int(len(job.val)),
            "n_train_distended": int((arrays.labels[job.train] == 1).sum()),
            "record": record,
        }
        publish(job.entry, lambda d: _save(peer, d), info)
        return peer, {**info, "cached": False, "cache": str(job.entry)}


def _save(peer: Peer, directory: Path) -> None:
    peer.save(directory)
