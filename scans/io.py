"""Small file helpers: atomic writes and output-directory confinement."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide results from others


def atomic_write(path: Path | str, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place (``write``'s
    return value is ignored: ``lambda tmp: torch.save(obj, tmp)`` saves a checkpoint atomically).

    A killed process leaves either the old file or the new one, never a partial file.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write_text(target, "hi"); target.read_text()
    'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def write_png(path: Path | str, image: np.ndarray) -> None:
    """Write a uint8/uint16 gray or BGR image as PNG atomically."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())


def confined(root: Path | str, relative: Path | str) -> Path:
    """``root / relative``, refusing any path that resolves outside ``root``."""
    root_r = Path(root).resolve()
    target = (root_r / relative).resolve()
    if target != root_r and root_r not in target.parents:
        raise ValueError(f"refusing to write {target}: outside the output directory {root_r}")
    return target
