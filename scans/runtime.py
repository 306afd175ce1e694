"""Where code runs: the device resolver, torch thread settings, the cache home, the benchmark timer and
the peak-memory meter (:class:`PeakRSS`).

One module, so every package (``detectors``, ``reconstruction``, ``evaluation``, ``pipeline``)
resolves devices, threads and timings the same way.

>>> resolve_device("cpu")
'cpu'
>>> median_seconds(lambda: sum(range(100)), repeats=3) >= 0.0
True
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is usable, else ``"cpu"``; explicit names pass through.

    Returns a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``): ``torch.device(resolve_device(x))``
    where a tensor device is needed.
    """
    name = str(device)
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+(,\d+)*)?", name):
        raise ValueError(
            f"device must be one of {', '.join(DEVICES)} (or cuda:N, or cuda:0,1 for YOLOv5u), not {name!r}"
        )
    return name


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None``/0: leave as is), then restore the setting.

    Results depend on the thread count (float reductions), so training pins it and gives it back.
    """
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_threads(n: int | None) -> None:
    """Pin torch's CPU thread count for the rest of the process (``None``/0: torch's default)."""
    import torch

    if n:
        torch.set_num_threads(int(n))


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


def runtime_info() -> dict[str, Any]:
    """How this process computes: the torchrun world size, the distributed backend (None in one
    process) and torch's CPU thread count (float reductions, hence numbers, depend on it).

    >>> sorted(runtime_info())
    ['distributed_backend', 'torch_threads', 'world_size']
    """
    import torch
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized()
    return {
        "world_size": dist.get_world_size() if joined else 1,
        "distributed_backend": str(dist.get_backend()) if joined else None,
        "torch_threads": torch.get_num_threads(),
    }


def median_seconds(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (the first
    calls allocate and pick kernels)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


class Stopwatch:
    """Accumulates named phase durations: ``with watch("fit"): ...``; ``watch.seconds["fit"]``.

    >>> watch = Stopwatch()
    >>> with watch("a"):
    ...     pass
    >>> sorted(watch.seconds)
    ['a']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def keep_out_of_home() -> None:
    """Point third-party caches into the LoRIS cache (:func:`scans.runtime.cache_home`), reused by every
    run, unless the user chose a folder: matplotlib's config and font cache (``MPLCONFIGDIR``, which only
    helps before matplotlib is imported) and torch's inductor cache, which the first optimizer step
    creates in the temp folder (``TORCHINDUCTOR_CACHE_DIR``)."""
    wanted = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor"}
    if "matplotlib" not in sys.modules:
        wanted["MPLCONFIGDIR"] = "matplotlib"
    for variable, name in wanted.items():
        if not os.environ.get(variable):  # both libraries create the folder when they first write
            os.environ[variable] = str(cache_home() / name)


_MIB = 1024 * 1024
_STATM = Path("/proc/self/statm")


def _rss_bytes() -> int | None:
    """Resident set size now, from ``/proc/self/statm`` (None where there is no procfs)."""
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def _maxrss_bytes() -> int:
    """The process's peak RSS so far (``ru_maxrss``: KiB on Linux, bytes on macOS; 0 without ``resource``)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakRSS:
    """Peak resident memory of a block, in MiB: ``with PeakRSS() as m: ...``; ``m.peak_mib``, ``m.rise_mib``.

    ``ru_maxrss`` is monotonic over the process's life, so it cannot give one block's peak: a daemon
    thread samples ``/proc/self/statm`` every ``interval`` seconds instead, and ``ru_maxrss`` floors the
    peak when the process-wide maximum rose during the block (a spike between two samples). ``rise_mib``
    is the peak above the RSS at block start. Without procfs (not Linux) only ``ru_maxrss`` is left:
    ``method`` is then ``"ru_maxrss"`` and the peak is the process's, not the block's. Peaks are per
    block within one process: memory freed but kept by the allocator counts in later blocks' start.

    >>> with PeakRSS() as m:
    ...     block = bytearray(64 * 1024 * 1024)
    >>> m.peak_mib >= m.start_mib, m.rise_mib >= 0.0
    (True, True)
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.method = "sampled" if _rss_bytes() is not None else "ru_maxrss"
        self.start_mib = self.peak_mib = self.rise_mib = 0.0
        self._start = self._peak = self._maxrss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self._maxrss = _maxrss_bytes()
        self._start = self._peak = _rss_bytes() or self._maxrss
        if self.method == "sampled":
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        maxrss = _maxrss_bytes()
        peak = max(self._peak, _rss_bytes() or 0)
        if maxrss > self._maxrss or self.method == "ru_maxrss":  # a new process high was reached in the block
            peak = max(peak, maxrss)
        self.start_mib, self.peak_mib = self._start / _MIB, peak / _MIB
        self.rise_mib = max(0.0, self.peak_mib - self.start_mib)

    def to_dict(self) -> dict[str, float]:
        """``peak_rss_mib`` and ``rss_rise_mib``, rounded to 0.1 MiB."""
        return {"peak_rss_mib": round(self.peak_mib, 1), "rss_rise_mib": round(self.rise_mib, 1)}
