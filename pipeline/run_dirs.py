"""Run folders: naming, refusal to overwrite, the lock held while a run writes, resume state, provenance
files, and keeping third-party caches out of HOME."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import Config, dump
from pipeline.provenance import git_commit, machine, package_versions
from runtime.io import atomic_write_text

LOCK = ".lock"  # in the run folder while a process writes it; holds that process's PID
_ADDING: set[Path] = set()  # finished run folders a command may write for now (adding_to)


class RunDirError(RuntimeError):
    """The output folder cannot be used; the message says why."""


def check_out(out: Path) -> None:
    """Refuse an ``out`` that is a file, holds a finished run or is another program's folder, before
    anything is loaded, trained or written."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is an existing file, not a folder; choose another --out")
    if (out / "summary.json").exists() and out.resolve() not in _ADDING:
        raise RunDirError(f"{out} already holds a finished run (summary.json); choose another --out")
    if out.is_dir() and not (out / "config.yaml").is_file() and any(q.name != LOCK for q in out.iterdir()):
        raise RunDirError(f"{out} is not empty and is not a LoRIS run; choose another --out")


@contextlib.contextmanager
def adding_to(out: Path) -> Iterator[Path]:
    """Let :func:`check_out` accept the finished run in ``out`` inside the block: ``compare`` adds methods
    to a finished comparison (after checking that its settings match)."""
    key = Path(out).resolve()
    _ADDING.add(key)
    try:
        yield out
    finally:
        _ADDING.discard(key)


@contextlib.contextmanager
def run_lock(out: Path, check: Callable[[Path], None] = check_out) -> Iterator[Path]:
    """Hold ``<out>/.lock`` while the block writes ``out``: a second process refuses at once, naming the
    holder's PID. The lock goes with the process, also when it is killed. When the run refused before
    writing anything, the lock file is removed, and so is the folder if this call created it. ``check``
    refuses an unusable ``out`` first (run folders: :func:`check_out`; bundles: their own)."""
    from filelock import FileLock, Timeout

    check(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = (out / LOCK).read_text().strip() if (out / LOCK).is_file() else ""
        raise RunDirError(
            f"{out} is in use by another LoRIS process{f' (PID {pid})' if pid else ''}; "
            f"wait for it to finish, or choose another --out"
        ) from None
    try:
        (out / LOCK).write_text(f"{os.getpid()}\n")
        yield out
    finally:
        lock.release()
        if [q.name for q in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink(missing_ok=True)
            if created:
                out.rmdir()


def default_run_dir(cfg: Config, command: str) -> Path:
    """``<out_root>/<command>-<detector>-<profile>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.out_root or "runs") / f"{command}-{cfg.detector.name}-{cfg.profile}-{stamp}"


def run_config(cfg: Config, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run saves as ``config.yaml``: the resolved config (display settings left out: they do not
    change results) and ``run``, the command and its prior sources."""
    return {k: v for k, v in cfg.to_dict().items() if k != "progress"} | {"run": identity or {}}


# Settings added after run folders were saved, at the value that reproduces those runs: a folder made
# before a setting existed still matches a config that leaves it at this value.
ADDED_SETTINGS: dict[str, Any] = {"unet.box_weight": 1.0}


def backfill(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with every :data:`ADDED_SETTINGS` it lacks filled in (a copy).

    >>> backfill({"unet": {"epochs": 3}})["unet"]
    {'epochs': 3, 'box_weight': 1.0}
    """
    out = copy.deepcopy(saved)
    for dotted, value in ADDED_SETTINGS.items():
        *parents, leaf = dotted.split(".")
        node: Any = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return out


def prepare_run_dir(out: Path, cfg: Config, identity: dict[str, Any] | None = None) -> Path:
    """Create ``out``, or continue the unfinished run in it. A finished run (``summary.json`` present)
    is never overwritten.

    Rerunning the same command continues a half-finished run when its saved config and ``identity``
    (the command and its prior sources) match; otherwise it says why not.
    """
    out = Path(out)
    resolved = run_config(cfg, identity)
    check_out(out)
    old = out / "config.yaml"
    if old.is_file():
        # compared as values: 0 and 0.0 are one setting, whichever way a YAML file spelled it
        if backfill(yaml.safe_load(old.read_text())) != resolved:
            raise RunDirError(
                f"{out} holds an unfinished run with a different config; cannot continue it "
                f"(compare {old}); choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump(resolved))
    atomic_write_text(out / "versions.json", json.dumps(package_versions(), indent=1))
    atomic_write_text(out / "commit.txt", git_commit() + "\n")
    atomic_write_text(out / "machine.json", json.dumps(machine(), indent=1))
    return out


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_default))


def config_differences(a: Any, b: Any, key: str = "") -> list[str]:
    """Dotted keys where two saved configs differ, with both values.

    >>> config_differences({"seed": 0, "unet": {"epochs": 3}}, {"seed": 1, "unet": {"epochs": 3}})
    ['seed (0 vs 1)']
    """
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in config_differences(a.get(k), b.get(k), f"{key}.{k}" if key else k)]
    if a == b:
        return []
    what = " (the dataset's content)" if key == "run.data" else ""
    return [f"{key}{what} ({a!r:.60} vs {b!r:.60})"]
