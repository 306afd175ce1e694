"""Small file helpers: atomic writes, output-directory confinement and safe checkpoint loading.

Checkpoints are plain tensors and data, read with ``torch.load(weights_only=True)`` only
(``docs/design.md``); :func:`load_state` turns every failure into one :class:`CheckpointError`
that names the file, the problem and the fix.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch


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


class CheckpointError(ValueError):
    """A saved model file is missing, unreadable, corrupt or refused; the message names the file,
    the problem and the fix, and is meant to be shown to users as is (no traceback).

    >>> str(CheckpointError.about(Path("m/model.pt"), "not found"))
    'm/model.pt: not found; delete m/model.pt (or the cache entry that holds it) to retrain, or restore it'
    """

    @classmethod
    def about(cls, path: Path | str, problem: str, hint: str | None = None) -> CheckpointError:
        """``"<path>: <problem>; <hint>"``, the hint defaulting to deleting the file to retrain."""
        fix = hint or f"delete {path} (or the cache entry that holds it) to retrain, or restore it"
        return cls(f"{path}: {problem}; {fix}")


def _problem(path: Path, exc: BaseException) -> str:
    """What went wrong with ``torch.load(path, weights_only=True)``, in a few words."""
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or exc})"
    message = str(exc)
    if "GLOBAL" in message:  # the weights-only unpickler refused an import: the file would run code
        what = next(line.strip() for line in message.splitlines() if "GLOBAL" in line)
        return f"holds code or objects other than tensors and plain data, so it was not opened ({what})"
    if isinstance(exc, EOFError):
        return "is empty or truncated"
    if "deserialize object on" in message:  # saved on a GPU, loaded without one and without map_location
        return f"needs a device this machine lacks ({message.splitlines()[0][:160]}); pass map_location='cpu'"
    if zipfile.is_zipfile(path):
        if isinstance(exc, pickle.UnpicklingError):
            return "holds objects other than tensors and plain data, so it was not opened"
        return "is corrupt (a damaged PyTorch archive)"
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"PK":  # a zip's header without its central directory: cut short
        return "is truncated or corrupt (an incomplete PyTorch archive)"
    return "is not a PyTorch checkpoint (unrecognised bytes, or a plain pickle, which is never opened)"


def load_state(
    path: Path | str, map_location: str | torch.device | None = None, hint: str | None = None
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a dict (a ``state_dict`` or a checkpoint of plain data).

    A missing, truncated or corrupt file, a pickle that would run code and a file holding anything but a
    dict all raise :class:`CheckpointError` naming ``path``; ``hint`` replaces the suggested fix
    (for example ``"delete the cache entry <dir> to retrain"``). Nothing in the file is ever executed.

    >>> import tempfile, torch
    >>> f = Path(tempfile.mkdtemp()) / "w.pt"; torch.save({"w": torch.ones(2)}, f)
    >>> load_state(f)["w"].tolist()
    [1.0, 1.0]
    >>> _ = f.write_bytes(b"not a checkpoint")
    >>> load_state(f)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    runtime.io.CheckpointError: .../w.pt: is not a PyTorch checkpoint ...
    """
    import torch

    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:  # torch warns about odd pickles before failing on them
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, KeyError... on bad bytes
            raise CheckpointError.about(path, _problem(path, exc), hint) from None
    for w in caught:  # a file that loaded: its warnings stand
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(state, dict):
        raise CheckpointError.about(path, f"holds a {type(state).__name__}, not a dict of tensors", hint)
    return state


def load_weights(
    module: torch.nn.Module, path: Path | str, map_location: str | torch.device | None = None, hint: str | None = None
) -> torch.nn.Module:
    """Load the ``state_dict`` file ``path`` into ``module`` (strict); a file that does not fit the
    module (missing, unexpected or misshapen tensors) also raises :class:`CheckpointError`. Returns ``module``.

    >>> import tempfile, torch
    >>> f = Path(tempfile.mkdtemp()) / "w.pt"; torch.save(torch.nn.Linear(2, 1).state_dict(), f)
    >>> load_weights(torch.nn.Linear(3, 1), f)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    runtime.io.CheckpointError: .../w.pt: does not fit the model (...); ...
    """
    state = load_state(path, map_location=map_location, hint=hint)
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise CheckpointError.about(path, f"does not fit the model ({detail})", hint) from None
    return module


def load_meta(path: Path | str, hint: str | None = None) -> dict[str, Any]:
    """The JSON object saved beside a checkpoint (a model's config and metadata); a missing or malformed
    file raises :class:`CheckpointError` naming it.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "model.json"; _ = f.write_text('{"a": 1}')
    >>> load_meta(f)
    {'a': 1}
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError.about(path, "not found", hint) from None
    except OSError as exc:
        raise CheckpointError.about(path, f"cannot be read ({exc.strerror or exc})", hint) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError.about(path, f"is not valid JSON ({exc})", hint) from None
    if not isinstance(doc, dict):
        raise CheckpointError.about(path, f"holds a JSON {type(doc).__name__}, not an object", hint)
    return doc
