"""The benchmark timer (:func:`median_seconds`), named phase durations (:class:`Stopwatch`) and the
peak-memory meter (:class:`PeakRSS`).

>>> median_seconds(lambda: sum(range(100)), repeats=3) >= 0.0
True
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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
