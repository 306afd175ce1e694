"""The shared training helper: budget, early stopping, random streams and thread scope."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from runtime.training import Budget, EarlyStopping, seeded_global_rng, streams, training_scope


def test_budget_runs_every_unit_then_stops_with_its_unit_name() -> None:
    budget = Budget(4, unit="epochs")
    assert list(budget.units()) == [0, 1, 2, 3]
    assert budget.stop_reason == "epochs" and budget.ran == 4
    resumed = Budget(4, start=2)
    assert list(resumed.units()) == [2, 3] and resumed.stop_reason == "steps"


def test_the_time_cap_is_off_by_default_and_stops_before_an_overrun() -> None:
    slow = Budget(3)
    assert slow.max_seconds is None and slow.fraction_of_time() == 0.0
    for _ in slow.units():
        time.sleep(0.01)  # no cap: slow units all run
    assert slow.ran == 3 and slow.stop_reason == "steps"
    assert Budget(3, max_minutes=0).max_seconds is None  # 0 is off too

    capped = Budget(100, max_minutes=0.05 / 60)  # 50 ms
    for _ in capped.units():
        time.sleep(0.02)
    assert capped.stop_reason == "time"
    assert 1 <= capped.ran <= 3  # stops before the unit that would pass 50 ms
    # a resumed run counts the seconds of its earlier calls: already over the cap, nothing runs
    assert list(Budget(10, max_minutes=1 / 60, start=3, elapsed=61.0).units()) == []
    with pytest.raises(ValueError):
        Budget(3, max_minutes=-1)


def test_patience_stops_the_budget_and_ties_keep_the_earliest_best() -> None:
    stopper = EarlyStopping(patience=2)
    budget = Budget(10, stopper=stopper, unit="epochs")
    losses = iter([1.0, 0.5, 0.5, 0.7, 0.1])
    for epoch in budget.units():
        stopper.update(next(losses), at=epoch)
    assert budget.stop_reason == "patience" and budget.ran == 4
    assert stopper.best == 0.5 and stopper.best_at == 1  # the tie at epoch 2 is no improvement

    score = EarlyStopping(mode="max")
    assert [score.update(v) for v in (0.2, 0.4, 0.4, 0.3)] == [True, True, False, False]
    assert score.best_at == 1 and not score.should_stop  # no patience: only tracks the best
    with pytest.raises(ValueError):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError):
        EarlyStopping(mode="lowest")  # type: ignore[arg-type]


def test_streams_depend_on_the_seed_only() -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    a = streams(7)
    torch.manual_seed(999)
    np.random.seed(999)
    b = streams(7)
    assert torch.equal(torch.rand(5, generator=a.torch), torch.rand(5, generator=b.torch))
    assert np.array_equal(a.numpy.random(5), b.numpy.random(5))
    assert not torch.equal(torch.rand(5, generator=streams(8).torch), torch.rand(5, generator=streams(7).torch))


def test_scope_seeds_the_global_rng_and_gives_back_threads_and_rng() -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    draws = []
    for outside in (11, 22):
        torch.manual_seed(outside)  # whatever the caller's state, the block draws the same numbers
        with training_scope(3, threads=1):
            assert torch.get_num_threads() == 1
            draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])
    assert torch.get_num_threads() == threads

    torch.manual_seed(5)
    with seeded_global_rng(0):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream went on untouched

    with pytest.raises(RuntimeError), training_scope(0, threads=1):
        raise RuntimeError("training failed")
    assert torch.get_num_threads() == threads  # restored on errors too
