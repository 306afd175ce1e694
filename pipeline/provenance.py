"""What a run needs to be reproduced: package versions, git commit, machine."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "scikit-learn",
    "scikit-image",
    "scipy",
    "opencv-python-headless",
    "pycocotools",
    "pydicom",
    "ultralytics",
    "mmengine",
    "mmcv",
    "mmcv-lite",
    "mmdet",
    "matplotlib",
    "loris",
)
REPO = Path(__file__).resolve().parent.parent


def package_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Python's version and each of :data:`PACKAGES` and ``extra`` ("not installed" when missing).

    >>> package_versions(("no-such-package-x",))["no-such-package-x"]
    'not installed'
    """
    out = {"python": platform.python_version()}
    for name in (*PACKAGES, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    """A read-only git command on the checkout. ``--no-optional-locks``: ``git status`` would otherwise
    refresh the index under ``.git/index.lock``, a write into the project that can collide with the
    user's own git command."""
    cmd = ["git", "--no-optional-locks", "-C", str(REPO), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10)


def git_commit() -> str:
    """HEAD of the LoRIS checkout, with ``+dirty`` when the tree has uncommitted changes."""
    try:
        head = _git("rev-parse", "HEAD")
        head.check_returncode()
        dirty = _git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (timings depend on it more than on the core count), or ``platform.processor()``
    where ``cpuinfo`` has none (not Linux).

    >>> isinstance(cpu_model(), str)
    True
    """
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """The platform, CPU model and count, how this process computes (world size, distributed backend,
    torch threads: :func:`runtime.device.runtime_info`) and the GPU."""
    import os

    import torch

    from runtime.device import runtime_info

    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        **runtime_info(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
