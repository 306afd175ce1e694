"""The process environment: LoRIS's cache home and :func:`setup_environment`, the one explicit call at
every entry point that sets the environment variables LoRIS relies on (nothing is set on import).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_home(override: Path | str | None = None) -> Path:
    """LoRIS's cache folder: ``override``, else ``$LORIS_CACHE``, else ``$XDG_CACHE_HOME/loris``,
    else ``~/.cache/loris``. Trained models live in ``models/``, phantoms in ``phantom/``."""
    if override:
        return Path(override)
    env = os.environ.get("LORIS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loris"


def cache_home_source() -> str:
    """What chose :func:`cache_home`: ``LORIS_CACHE``, ``XDG_CACHE_HOME`` or ``HOME``.

    >>> cache_home_source() in ("LORIS_CACHE", "XDG_CACHE_HOME", "HOME")
    True
    """
    if os.environ.get("LORIS_CACHE"):
        return "LORIS_CACHE"
    return "XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "HOME"


class CacheHomeError(RuntimeError):
    """The LoRIS cache folder cannot be used; the message names it and the variable that chose it."""


def check_cache_home(override: Path | str | None = None) -> Path:
    """The cache folder (:func:`cache_home`), created when missing and checked writable by writing a file
    in it; else :class:`CacheHomeError` naming the folder and the environment variable that chose it,
    before any command trains or writes (torch's inductor cache, the phantom and the models live there).

    >>> import tempfile
    >>> check_cache_home(Path(tempfile.mkdtemp()) / "loris").is_dir()
    True
    """
    import tempfile

    path = cache_home(override)
    chosen = "the cache_dir setting" if override else f"${cache_home_source()}"
    fix = "point LORIS_CACHE at a writable folder (e.g. export LORIS_CACHE=/tmp/loris-cache)"
    if path.exists() and not path.is_dir():
        raise CacheHomeError(f"LoRIS cache {path} (from {chosen}) is a file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise CacheHomeError(f"LoRIS cache {path} (from {chosen}) is not a writable folder ({reason}); {fix}") from None
    return path


def _keep_out_of_home() -> None:
    """Point third-party caches into the LoRIS cache (:func:`cache_home`), reused by every
    run, unless the user chose a folder: matplotlib's config and font cache (``MPLCONFIGDIR``, which only
    helps before matplotlib is imported) and torch's inductor cache, which the first optimizer step
    creates in the temp folder (``TORCHINDUCTOR_CACHE_DIR``)."""
    wanted = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor"}
    if "matplotlib" not in sys.modules:
        wanted["MPLCONFIGDIR"] = "matplotlib"
    for variable, name in wanted.items():
        if not os.environ.get(variable):  # both libraries create the folder when they first write
            os.environ[variable] = str(cache_home() / name)


def setup_environment(check_cache: bool = False, cli_defaults: bool = False) -> None:
    """Set the environment variables LoRIS relies on; call it first thing at an entry point, before torch,
    matplotlib or ultralytics are imported (importing a LoRIS package changes nothing).

    Always: third-party caches go to the LoRIS cache, not TMPDIR or HOME (torch's inductor cache and, before
    matplotlib is imported, its config folder), unless the user chose a folder. ``cli_defaults`` (the
    ``python -m pipeline`` command): ultralytics offline, matplotlib's Agg backend and passive OpenMP
    waiting, each unless already set. ``check_cache``: the cache folder is created and checked writable
    (:func:`check_cache_home`, which raises :class:`CacheHomeError`).
    """
    if cli_defaults:
        os.environ.setdefault("YOLO_OFFLINE", "1")  # before anything imports ultralytics
        os.environ.setdefault("MPLBACKEND", "Agg")
        # Idle OpenMP workers sleep instead of spinning: on a busy 2-core machine spinning made
        # 2-thread U-Net training ~10x slower than 1 thread (measured); set before torch loads OpenMP.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if check_cache:
        check_cache_home()
    _keep_out_of_home()
