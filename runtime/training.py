"""What every training loop shares: the budget, early stopping, the random streams and the thread scope.

The U-Net (:mod:`reconstruction.train`), the box refiner (:mod:`detectors.refine`) and Co-DETR
(:mod:`detectors.codetr.detector`) drive their loops with it, so the three read their budgets,
seeds and threads the same way:

- the budget is a count of units (``epochs`` or ``steps``) plus ``max_minutes``, an opt-in
  wall-clock cap that is off by default (a cap that binds makes the result depend on the
  machine's speed);
- early stopping counts validations without a strict improvement (ties keep the earlier best);
- randomness comes from generators seeded from the one seed; the global torch RNG is seeded only
  inside :func:`training_scope`, which gives the caller's state back, as it does the thread count.

>>> budget = Budget(3, unit="epochs")
>>> [epoch for epoch in budget.units()], budget.stop_reason
([0, 1, 2], 'epochs')
>>> stopper = EarlyStopping(patience=2)
>>> [stopper.update(v) for v in (3.0, 2.0, 2.0, 2.5)], stopper.best, stopper.best_at, stopper.should_stop
([True, True, False, False], 2.0, 1, True)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from runtime.device import torch_threads
from runtime.distributed import broadcast_decision

_STOP_REASONS = (None, "patience", "time")  # the codes rank 0 broadcasts


class Budget:
    """``limit`` units (epochs or steps), ended sooner by the opt-in ``max_minutes`` cap or by ``stopper``.

    :meth:`units` yields the unit indices to run, from ``start`` (a resumed run). Before each unit it
    stops when ``stopper`` says so (``stop_reason`` ``"patience"``) or when the unit would overrun the
    cap, estimated from the previous unit (``"time"``); the first unit of a fresh run always runs, so
    a model always comes back. ``elapsed`` carries the seconds of earlier calls of a resumed run, so a
    killed and resumed run trains no longer than an uninterrupted one. Otherwise ``stop_reason`` is
    ``unit`` (``"epochs"`` or ``"steps"``) once the units are used up.

    >>> b = Budget(10, max_minutes=1e-9)
    >>> list(b.units()), b.stop_reason
    ([0], 'time')
    >>> Budget(5).max_seconds is None
    True
    """

    def __init__(
        self,
        limit: int,
        max_minutes: float | None = None,
        *,
        stopper: EarlyStopping | None = None,
        start: int = 0,
        elapsed: float = 0.0,
        unit: str = "steps",
    ) -> None:
        if limit < 0 or start < 0:
            raise ValueError(f"the budget and its start must be non-negative, got {limit} and {start}")
        if max_minutes is not None and max_minutes < 0:
            raise ValueError(f"max_minutes must be positive or off (None/0), got {max_minutes}")
        self.limit, self.start, self.stopper = int(limit), int(start), stopper
        self.max_seconds = 60.0 * float(max_minutes) if max_minutes else None
        self.elapsed = float(elapsed)  # seconds spent in units, this call and earlier ones
        self.last_unit = 0.0  # seconds of the latest unit
        self.ran = 0  # units run in this call
        self.stop_reason = unit
        self._t0: float | None = None  # start of the unit in progress

    def spent(self) -> float:
        """Seconds spent so far, the unit in progress included (what a checkpoint should carry)."""
        return self.elapsed + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def fraction_of_time(self) -> float:
        """Share of the cap used so far, the unit in progress included (0.0 when there is no cap).

        Distributed, with a cap, it is rank 0's share on every rank (a collective call).
        """
        return 0.0 if self.max_seconds is None else broadcast_decision(self.spent() / self.max_seconds)

    def _out_of_time(self, unit: int) -> bool:
        if self.max_seconds is None or (self.ran == 0 and unit == 0):
            return False
        return self.elapsed + self.last_unit > self.max_seconds

    def _stop(self, unit: int | None) -> str | None:
        """Why to stop before ``unit`` (None: after the last one), as rank 0 sees it when distributed.

        The clock and a float comparison can differ between ranks; every rank follows rank 0, so
        none is left waiting in a collective (see :func:`runtime.distributed.broadcast_decision`).
        """
        code = 0
        if self.stopper is not None and self.stopper.should_stop:
            code = 1
        elif unit is not None and self._out_of_time(unit):
            code = 2
        if self.stopper is not None or self.max_seconds is not None:
            code = broadcast_decision(code)
        return _STOP_REASONS[code]

    def units(self) -> Iterator[int]:
        """The unit indices to run; the time of each one is counted when the loop asks for the next."""
        for unit in range(self.start, self.limit):
            reason = self._stop(unit)
            if reason is not None:
                self.stop_reason = reason
                return
            t0 = self._t0 = time.perf_counter()
            yield unit
            self._t0 = None
            self.last_unit = time.perf_counter() - t0
            self.elapsed += self.last_unit
            self.ran += 1
        if self.stopper is not None and self._stop(None) == "patience":
            self.stop_reason = "patience"


@dataclass
class EarlyStopping:
    """Track the best validation value; stop after ``patience`` validations without a strict improvement.

    ``mode="min"`` for a loss, ``"max"`` for a score. A tie is no improvement, so the earliest best
    is kept whatever the order of evaluation. ``patience=None`` only tracks the best.

    >>> s = EarlyStopping(patience=None, mode="max")
    >>> s.update(0.5, at=4), s.update(0.5, at=9), s.best_at, s.should_stop
    (True, False, 4, False)
    """

    patience: int | None = None
    mode: Literal["min", "max"] = "min"
    best: float = math.nan  # nan until the first update
    best_at: int = -1
    bad: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1 or None, got {self.patience}")
        if math.isnan(self.best):
            self.best = math.inf if self.mode == "min" else -math.inf

    def update(self, value: float, at: int | None = None) -> bool:
        """Record a validation ``value`` (made at epoch/step ``at``; default: the count so far).
        True when it is a new best."""
        at = self.seen if at is None else int(at)
        self.seen += 1
        better = value < self.best if self.mode == "min" else value > self.best
        if better:
            self.best, self.best_at, self.bad = float(value), at, 0
        else:
            self.bad += 1
        return bool(better)

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad >= self.patience


@dataclass
class Streams:
    """The random streams of one training run: ``torch`` on ``device`` and ``numpy``, both from one seed."""

    torch: torch.Generator
    numpy: np.random.Generator


def streams(seed: int, device: str | torch.device = "cpu") -> Streams:
    """Generators seeded from ``seed``; they leave the global RNGs alone.

    >>> a, b = streams(3), streams(3)
    >>> bool(torch.equal(torch.rand(2, generator=a.torch), torch.rand(2, generator=b.torch)))
    True
    >>> int(a.numpy.integers(100)) == int(b.numpy.integers(100))
    True
    """
    return Streams(torch.Generator(device=device).manual_seed(int(seed)), np.random.default_rng(int(seed)))


def _cuda_indices(device: str | torch.device | None) -> list[int]:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: str | torch.device | None = None) -> Iterator[None]:
    """Seed torch's global RNG (CPU, and ``device``'s when it is a GPU) for the block, then restore it.

    For what draws from the global RNG and takes no generator: weight initialisation and library
    code (mmdet's denoising queries). The caller's random state is the same after the block.

    >>> before = torch.random.get_rng_state()
    >>> with seeded_global_rng(0):
    ...     a = torch.rand(1)
    >>> with seeded_global_rng(0):
    ...     b = torch.rand(1)
    >>> bool(torch.equal(a, b)), bool(torch.equal(before, torch.random.get_rng_state()))
    (True, True)
    """
    cuda = _cuda_indices(device)
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(int(seed))
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def training_scope(seed: int, threads: int | None = None, device: str | torch.device | None = None) -> Iterator[None]:
    """The block runs with ``threads`` torch threads (None/0: unchanged) and the global RNG seeded
    from ``seed``; both are given back afterwards.

    >>> n = torch.get_num_threads()
    >>> with training_scope(0, threads=1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == n
    True
    """
    with torch_threads(threads), seeded_global_rng(seed, device):
        yield


def summary_value(stopper: EarlyStopping, missing: Any = None) -> Any:
    """The best value for a summary, or ``missing`` when nothing was validated.

    >>> summary_value(EarlyStopping(), missing=-1.0)
    -1.0
    """
    return stopper.best if stopper.best_at >= 0 else missing
