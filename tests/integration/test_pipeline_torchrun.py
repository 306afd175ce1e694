"""``torchrun --nproc-per-node N -m pipeline run``: rank 0 decides every cache hit, every rank fits,
rank 0 alone writes; and a 2-process gloo run matches the single-process run (slow)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.shared import cache, models
from pipeline.shared.cache import CacheScope, fit_or_load, publish
from tests.helpers import random_scans
from tests.network_guard import guarded_env

pytestmark = pytest.mark.integration  # end to end across packages (issue 27: tests/integration/)

ROOT = Path(__file__).resolve().parents[2]


def _as_rank(monkeypatch: pytest.MonkeyPatch, r: int, rank0_hit: bool | None = None) -> list[str]:
    """Pretend to be rank ``r`` of 2; rank 0's broadcast decision is ``rank0_hit``. Returns the call log."""
    log: list[str] = []

    def broadcast(flag: bool) -> bool:
        log.append(f"broadcast {flag}")
        return flag if r == 0 else bool(rank0_hit)

    @contextlib.contextmanager
    def lock(entry: Path) -> Iterator[None]:
        log.append("lock")
        yield

    for module in (cache, models):
        monkeypatch.setattr(module, "is_distributed", lambda: True)
        monkeypatch.setattr(module, "is_main", lambda: r == 0)
    monkeypatch.setattr(cache, "rank", lambda: r)
    monkeypatch.setattr(cache, "broadcast_decision", broadcast)
    monkeypatch.setattr(cache, "barrier", lambda: log.append("barrier"))
    monkeypatch.setattr(cache, "cache_lock", lock)
    return log


def _fitter(entry: Path, log: list[str], write: bool) -> Any:
    def fit_() -> tuple[str, dict[str, Any]]:
        log.append("fit")
        if write:  # what rank 0's fitters do
            publish(entry, lambda p: (p.mkdir(), (p / "model.txt").write_text("trained")), {"fit_s": 1.0})
        return "trained", {"fit_s": 1.0}

    return fit_


def _read(p: Path) -> str:
    return (p / "model.txt").read_text()


def test_rank0_takes_the_lock_decides_and_publishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = tmp_path / "m-1"
    log = _as_rank(monkeypatch, 0)
    model, info = fit_or_load(entry, _read, _fitter(entry, log, write=True))
    assert (model, info["cached"], info["cache"]) == ("trained", False, str(entry))
    assert log == ["lock", "broadcast False", "fit", "barrier"]  # published before the others load
    log.clear()
    model, info = fit_or_load(entry, _read, _fitter(entry, log, write=True))
    assert (model, info["cached"], info["fit_s"]) == ("trained", True, 1.0)
    assert log == ["lock", "broadcast True", "barrier"]


def test_other_rank_follows_a_hit_without_lock_or_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = tmp_path / "m-1"
    publish(entry, lambda p: (p.mkdir(), (p / "model.txt").write_text("rank 0's")), {"fit_s": 2.0})
    log = _as_rank(monkeypatch, 1, rank0_hit=True)
    model, info = fit_or_load(entry, _read, _fitter(entry, log, write=False))
    assert (model, info["cached"], info["fit_s"]) == ("rank 0's", True, 2.0)
    assert log == ["broadcast False", "barrier"]  # never the lock (rank 0 holds it), never a fit


@pytest.mark.parametrize("every_rank", [True, False])
def test_other_rank_follows_a_miss_even_when_it_sees_an_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_rank: bool
) -> None:
    entry = tmp_path / "m-1"
    publish(entry, lambda p: (p.mkdir(), (p / "model.txt").write_text("rank 0's")), {"fit_s": 3.0})
    log = _as_rank(monkeypatch, 1, rank0_hit=False)  # e.g. rank 0 found it broken and retrains
    model, info = fit_or_load(entry, _read, _fitter(entry, log, write=False), every_rank=every_rank)
    # it trains alongside rank 0 (its collectives pair with rank 0's) only when the fit is a DDP one,
    # and keeps what rank 0 published after the barrier, so that every rank holds one model
    assert log == ["broadcast False"] + ["fit"] * every_rank + ["barrier"]
    assert (model, info["cached"]) == ("rank 0's", False)


def test_other_rank_refuses_when_rank0_published_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _as_rank(monkeypatch, 1, rank0_hit=False)
    with pytest.raises(RuntimeError, match="rank 1"):
        fit_or_load(tmp_path / "m-1", _read, _fitter(tmp_path / "m-1", log, write=False))


def test_refiner_of_other_rank_trains_but_never_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detectors.refine import BoxRefiner

    arr, tr, va = random_scans(6, 0), np.arange(4), np.arange(4, 6)
    where = CacheScope("data", 32, 0, (0, 1, 2, 3), (4, 5))
    options = {"steps": 2, "batch_size": 2, "width": 8}
    rank0 = BoxRefiner(device="cpu", seed=0, **options)
    log = _as_rank(monkeypatch, 1, rank0_hit=False)

    entry = where.entry(tmp_path, "refiner", version=2, refiner=models.refiner_key({**options, "seed": 0}))

    def rank0_publishes() -> None:  # what rank 0 does before the barrier lets this rank on
        log.append("barrier")
        publish(entry, rank0.save, {"fit_s": 0.0, "n_train": 4})

    monkeypatch.setattr(cache, "barrier", rank0_publishes)
    monkeypatch.setattr(models, "publish", lambda *a: pytest.fail("a rank other than 0 wrote the cache"))
    ref, info = models.fit_refiner(options, 0, where, tmp_path, "cpu", arr, tr, va)
    assert log == ["broadcast False", "barrier"] and info["cached"] is False
    a, b = ref.net.state_dict(), rank0.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # rank 0's model, not its own


def test_outside_torchrun_hides_torchruns_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "is_distributed", lambda: True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert models.solo_device("cuda") == "cuda:0,1" and models.solo_device("cpu") == "cpu"
    with models.outside_torchrun():
        assert not {"RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"} & set(os.environ)
    assert os.environ["RANK"] == "0" and os.environ["TORCHELASTIC_RUN_ID"] == "x"
    fake = type(sys)("ultralytics.utils")
    fake.RANK = 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ultralytics.utils", fake)
    with pytest.raises(RuntimeError, match="ultralytics"), models.outside_torchrun():
        pass


def test_one_process_is_unchanged(tmp_path: Path) -> None:
    log: list[str] = []
    entry = tmp_path / "m-1"
    assert fit_or_load(entry, _read, _fitter(entry, log, write=True))[1]["cached"] is False
    assert fit_or_load(entry, _read, _fitter(entry, log, write=True))[1]["cached"] is True
    assert log == ["fit"]


# ---------------------------------------------------------------- two gloo processes

# Each rank's BatchNorm normalises with the statistics of its half of every global batch, so the
# U-Net's trajectory differs slightly from one process (plus float reduction order in the gradient
# all-reduce): its best validation loss within 1%, as in tests/runtime/test_distributed.py. Image and pixel
# metrics on a test part of ~16 scans move in steps (one swapped pair of scores changes I-AUROC by
# 1/(positives * negatives) ~ 0.02), so they are held to 0.05.
VAL_LOSS_RTOL = 0.01
METRIC_ATOL = 0.05
TINY = [
    "image_size=64",
    "folds=3",
    "unet.epochs=2",
    "riad.epochs=1",
    "riad.ks=[2,8]",
    "threads=1",
    "evaluation.figures=false",
]


def _run(launcher: list[str], data: Path, out: Path, models: Path, detector: str = "gt", *sets: str) -> dict[str, Any]:
    env = guarded_env({**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"})
    env["LORIS_CACHE"] = str(models.parent)
    args = ["-m", "pipeline", "run", "--profile", "quick", "--detector", detector, "--no-progress"]
    args += ["--data", str(data), "--out", str(out)]
    args += [a for s in [*TINY, f"cache_dir={models}", *sets] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(json.loads((out / "summary.json").read_text()))


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--local-addr", "127.0.0.1"]


def _phantom(tmp_path: Path) -> Path:
    from scans.phantom import generate_dataset

    return generate_dataset(
        tmp_path / "data", n_images=48, n_distended=16, n_patients=16, size=64, seed=0, progress=False
    )


@pytest.mark.slow
def test_two_gloo_processes_run_like_one(tmp_path: Path) -> None:
    data = _phantom(tmp_path)
    two = _run(TORCHRUN, data, tmp_path / "two", tmp_path / "cache-two" / "models")
    one = _run([], data, tmp_path / "one", tmp_path / "cache-one" / "models")

    assert list((tmp_path / "two").rglob("summary.json")) == [tmp_path / "two" / "summary.json"]
    entries = [p for p in (tmp_path / "cache-two" / "models").iterdir() if p.is_dir()]
    assert sorted(p.name.split("-")[1] for p in entries) == ["riad", "single"]  # no .tmp, nothing moved aside
    for p in entries:  # each published once, by rank 0
        assert (p / "DONE").is_file() and not (p / "work").exists()

    for key in ("unet", "riad"):
        a, b = two["fold_info"][0][key], one["fold_info"][0][key]
        assert a["epochs_run"] == b["epochs_run"] and a["cached"] is b["cached"] is False
        assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], rel=VAL_LOSS_RTOL)
        print(f"{key} best val loss: 2 ranks {a['best_val_loss']:.6f}, 1 process {b['best_val_loss']:.6f}")
    # each rank's BatchNorm saw half of every batch: the two runs really trained differently
    assert two["fold_info"][0]["unet"]["best_val_loss"] != one["fold_info"][0]["unet"]["best_val_loss"]
    print(f"wall time: 2 ranks {two['timing']['total_s']:.1f} s, 1 process {one['timing']['total_s']:.1f} s")
    rows = {f"loris+{m}": (two["reconstruction"][m], one["reconstruction"][m]) for m in one["reconstruction"]}
    rows["riad"] = (two["riad"], one["riad"])
    for name, (a, b) in rows.items():
        for metric in ("i_auroc", "p_auroc", "dice_oracle", "dice_val"):
            x, y = a[metric]["mean"], b[metric]["mean"]
            print(f"{name} {metric}: 2 ranks {x:.4f}, 1 process {y:.4f}")
            assert x == pytest.approx(y, abs=METRIC_ATOL), (name, metric)


@pytest.mark.slow
def test_yolov5_trains_on_rank_0_alone_like_one_process(tmp_path: Path) -> None:
    """Rank 0 trains YOLOv5u as one plain process (torchrun's variables hidden from ultralytics, so no
    sharded data and no collectives of its own) while rank 1 waits, then loads it from the cache."""
    data = _phantom(tmp_path)
    sets = ("unet.epochs=1", "riad.enabled=false", "detector.refine=false", "detector.options={epochs: 1, imgsz: 64}")
    two = _run(TORCHRUN, data, tmp_path / "two", tmp_path / "cache-two" / "models", "yolov5", *sets)
    one = _run([], data, tmp_path / "one", tmp_path / "cache-one" / "models", "yolov5", *sets)
    a, b = two["fold_info"][0]["detector_yolov5"], one["fold_info"][0]["detector_yolov5"]
    assert a["train_images"] == b["train_images"] == a["n_train"]  # all of them, not rank 0's share
    weights = [
        torch.load(next((tmp_path / f"cache-{n}" / "models").glob("det-yolov5-*")) / "weights.pt", weights_only=True)
        for n in ("two", "one")
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
