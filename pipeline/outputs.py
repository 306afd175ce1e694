"""Run folders: naming, refusal to overwrite, resume state, and provenance files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import Config, dump
from pipeline.provenance import git_commit, machine, package_versions
from scans.io import atomic_write_text


class RunDirError(RuntimeError):
    """The output folder cannot be used; the message says why."""


def default_run_dir(cfg: Config, command: str) -> Path:
    """``<out_root>/<command>-<detector>-<profile>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.out_root or "runs") / f"{command}-{cfg.detector.name}-{cfg.profile}-{stamp}"


def run_config(cfg: Config, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run saves as ``config.yaml``: the resolved config (display settings left out: they do not
    change results) and ``run``, the command and its prior sources."""
    return {k: v for k, v in cfg.to_dict().items() if k != "progress"} | {"run": identity or {}}


def prepare_run_dir(out: Path, cfg: Config, identity: dict[str, Any] | None = None) -> Path:
    """Create ``out``, or continue the unfinished run in it. A finished run (``summary.json`` present)
    is never overwritten.

    Rerunning the same command continues a half-finished run when its saved config and ``identity``
    (the command and its prior sources) match; otherwise it says why not.
    """
    out = Path(out)
    resolved = run_config(cfg, identity)
    if (out / "summary.json").exists():
        raise RunDirError(f"{out} already holds a finished run (summary.json); choose another --out")
    if out.exists() and any(out.iterdir()):
        old = out / "config.yaml"
        if not old.is_file():
            raise RunDirError(f"{out} is not empty and is not a LoRIS run; choose another --out")
        # compared as values: 0 and 0.0 are one setting, whichever way a YAML file spelled it
        if yaml.safe_load(old.read_text()) != resolved:
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
