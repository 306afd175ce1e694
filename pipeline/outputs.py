"""Run folders: naming, refusal to overwrite, resume state, and provenance files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import dump
from pipeline.provenance import git_commit, machine, package_versions
from scans.io import atomic_write_text


class RunDirError(RuntimeError):
    """The output folder cannot be used; the message says why."""


def default_run_dir(cfg: dict[str, Any], command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{command}-{cfg['detector']['name']}-{cfg['profile']}-{stamp}"
    return Path(cfg.get("out_root") or "runs") / name


def prepare_run_dir(
    out: Path, cfg: dict[str, Any], resume: bool = True, identity: dict[str, Any] | None = None
) -> Path:
    """Create ``out`` or resume it. A finished run (``summary.json`` present) is never overwritten.

    A half-finished run resumes only when its resolved config and ``identity`` (the command and
    its prior sources) match; otherwise it says why not.
    """
    out = Path(out)
    # display settings do not change results, so they do not block a resume
    resolved = dump({k: v for k, v in cfg.items() if k != "progress"} | {"run": identity or {}})
    if (out / "summary.json").exists():
        raise RunDirError(f"{out} already holds a finished run (summary.json); choose another --out")
    if out.exists() and any(out.iterdir()):
        old = out / "config.yaml"
        if not old.is_file():
            raise RunDirError(f"{out} is not empty and is not a LoRIS run; choose another --out")
        if old.read_text() != resolved:
            raise RunDirError(
                f"{out} holds an unfinished run with a different config; cannot resume it "
                f"(compare {old}); choose another --out"
            )
        if not resume:
            raise RunDirError(f"{out} holds an unfinished run; pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", resolved)
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
