"""Multi-process training (runtime.distributed): no-ops in one process, shards of one permutation,
and two gloo processes under torchrun that train one U-Net (and one box refiner) together.

Run as a script, this file is the torchrun worker of the slow tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from runtime import distributed, training
from runtime.training import Budget, EarlyStopping, streams
from tests.helpers import random_scans, toy_box_scans
from tests.network_guard import guarded_env

ROOT = Path(__file__).resolve().parents[2]
# Two ranks each see half of a batch: BatchNorm normalises with the statistics of that half, not of
# the whole batch, so the trajectory differs slightly from one process (plus float reduction order
# in the gradient all-reduce). Over 2 epochs of the tiny U-Net this stays within 1% of the loss (0.2% measured).
VAL_LOSS_RTOL = 0.01
GLOBAL_BATCH = 4


def test_helpers_are_no_ops_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == torch.device("cpu") and not torch.distributed.is_initialized()
    state = (distributed.is_distributed(), distributed.rank(), distributed.world_size(), distributed.is_main())
    assert state == (False, 0, 1, True)
    perm = torch.randperm(7)
    assert distributed.shard(perm) is perm
    assert distributed.all_reduce_mean(0.1, weight=0.0) == 0.1 and distributed.loss_scale(2, 5) == 1.0
    decide = distributed.broadcast_decision
    assert decide(False) is False and decide(3) == 3 and decide(0.5) == 0.5
    net = torch.nn.BatchNorm1d(2)
    assert distributed.wrap(net) is net
    before = net.running_mean.clone()
    distributed.sync_buffers(net)
    distributed.barrier()
    assert torch.equal(net.running_mean, before)


def _as_rank(monkeypatch: pytest.MonkeyPatch, r: int, size: int) -> None:
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: r)
    monkeypatch.setattr(distributed, "world_size", lambda: size)


@pytest.mark.parametrize("size", [2, 3])
def test_shards_of_one_permutation_are_disjoint_and_cover_it(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    n, batch = 11, 4
    shares, perms = [], []
    for r in range(size):
        _as_rank(monkeypatch, r, size)
        perm = torch.randperm(n, generator=streams(5).torch)  # each rank draws from the one seed
        perms.append(perm)
        shares.append(distributed.shard(perm).tolist())
        # sharding each global batch gives a share of about batch / size, and together that batch
        for s in range(0, n, batch):
            glob = perm[s : s + batch]
            part = distributed.shard(glob)
            assert len(part) in (len(glob) // size, -(-len(glob) // size))
            assert set(part.tolist()) <= set(glob.tolist())
    assert all(torch.equal(p, perms[0]) for p in perms)
    flat = [i for s in shares for i in s]
    assert sorted(flat) == list(range(n)) and len(flat) == len(set(flat))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_loss_scale_makes_the_mean_over_ranks_the_mean_over_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    losses = np.array([0.3, 0.9, 0.4, 0.2, 0.7])  # per-sample losses of one short batch
    size = 2
    parts = [losses[r::size] for r in range(size)]
    means = []
    for r, p in enumerate(parts):
        _as_rank(monkeypatch, r, size)
        means.append(p.mean() * distributed.loss_scale(len(p), len(losses)))
    assert np.isclose(np.mean(means), losses.mean())  # what DDP's gradient average computes


def test_budget_follows_rank_zeros_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    # rank 0 ran out of time (code 2) although this rank's clock has no cap to speak of
    monkeypatch.setattr(training, "broadcast_decision", lambda code: 2 if isinstance(code, int) else 0.75)
    b = Budget(5, max_minutes=1e6)
    assert list(b.units()) == [] and b.stop_reason == "time"
    assert b.fraction_of_time() == 0.75
    # rank 0's stopper says stop (code 1) before this rank's does
    s = Budget(5, stopper=EarlyStopping(patience=3))
    monkeypatch.setattr(training, "broadcast_decision", lambda code: 1)
    assert list(s.units()) == [] and s.stop_reason == "patience"


# ---------------------------------------------------------------- two gloo processes


def _unet_config() -> Any:
    from reconstruction.train import TrainConfig
    from reconstruction.unet import UNetConfig

    return TrainConfig(
        unet=UNetConfig.profile("tiny"),
        max_epochs=2,
        batch_size=GLOBAL_BATCH,
        eval_batch_size=2,
        progress=False,
        num_threads=1,
        device="cpu",
    )


def _refiner() -> Any:
    from detectors.refine import BoxRefiner

    return BoxRefiner(steps=3, batch_size=GLOBAL_BATCH, seed=0, width=8)


def _worker(out: Path) -> None:
    """One torchrun rank: check the collectives, train a U-Net and a refiner, write what it ends with."""
    from reconstruction.train import train_unet

    distributed.init_from_env("cpu")
    r, size = distributed.rank(), distributed.world_size()
    perm = torch.randperm(10, generator=streams(3).torch)
    helpers = {
        "perm": perm.tolist(),
        "share": distributed.shard(perm).tolist(),
        "mean": distributed.all_reduce_mean(float(r + 1), weight=float(r + 1)),
        "decision": distributed.broadcast_decision(r == 0),
        "value": distributed.broadcast_decision(float(r) + 0.5),
    }
    res = train_unet(random_scans(10, 0), random_scans(5, 1), _unet_config(), workdir=out / "unet")
    ref = _refiner()
    data = random_scans(6, 2)
    info = ref.fit(data.images, data.boxes, data.images, data.boxes)
    torch.save(res.model.state_dict(), out / f"unet{r}.pt")
    torch.save(ref.net.state_dict(), out / f"refiner{r}.pt")
    rec = {"world": size, "helpers": helpers, "history": res.history, "best_val": res.best_val_loss}
    rec["refiner"] = {k: v for k, v in info.items() if k != "refiner_seconds"}
    (out / f"rank{r}.json").write_text(json.dumps(rec))
    distributed.shutdown()


def _codetr_worker(out: Path) -> None:
    """One torchrun rank: fit a small Co-DINO for 2 epochs of 2 global batches; write its weights."""
    from tests.detectors.test_codetr import _detector  # a torchrun rank: the repository is on PYTHONPATH

    distributed.init_from_env("cpu")
    det = _detector(image_size=64, epochs=2, batch_size=GLOBAL_BATCH // 2, warmup_iters=1, val_interval=1)
    data = toy_box_scans(4, 64, seed=2)
    summary = det.fit(data, data.subset([0, 1]), out / "codetr")
    torch.save(det.model.state_dict(), out / f"codetr{distributed.rank()}.pt")
    (out / f"codetr{distributed.rank()}.json").write_text(
        json.dumps({k: summary[k] for k in ("iterations", "best_val_mean_iou")})
    )
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(out: Path, worker: str = "unet", nproc: int = 2) -> None:
    env = guarded_env({**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={nproc}"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, worker, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_gloo_processes_train_one_model_like_one_process(tmp_path: Path) -> None:
    from reconstruction.train import BEST_DIR, LAST, train_unet

    _torchrun(tmp_path)
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [rec["world"] for rec in recs] == [2, 2]

    h0, h1 = recs[0]["helpers"], recs[1]["helpers"]
    assert h0["perm"] == h1["perm"]  # one permutation, from the one seed
    assert sorted(h0["share"] + h1["share"]) == sorted(h0["perm"]) and not set(h0["share"]) & set(h1["share"])
    assert h0["mean"] == h1["mean"] == pytest.approx(5 / 3)
    assert h0["decision"] is h1["decision"] is True and h0["value"] == h1["value"] == 0.5

    # DDP keeps one model: every parameter and BatchNorm buffer is identical on both ranks
    for name in ("unet", "refiner"):
        a, b = (torch.load(tmp_path / f"{name}{r}.pt", weights_only=True) for r in range(2))
        assert _equal_states(a, b), name
    losses = [[(h["train_loss"], h["val_loss"]) for h in rec["history"]] for rec in recs]
    assert losses[0] == losses[1] and recs[0]["refiner"] == recs[1]["refiner"]  # all-reduced: the same everywhere
    assert (tmp_path / "unet" / LAST).is_file() and (tmp_path / "unet" / BEST_DIR).is_dir()

    # the same global batch in one process gives the same run up to BatchNorm's per-rank statistics
    single = train_unet(random_scans(10, 0), random_scans(5, 1), _unet_config())
    dist_val = [h["val_loss"] for h in recs[0]["history"]]
    one_val = [h["val_loss"] for h in single.history]
    assert len(dist_val) == len(one_val) == 2
    print("val loss, 2 ranks:", dist_val, "1 process:", one_val)
    np.testing.assert_allclose(dist_val, one_val, rtol=VAL_LOSS_RTOL)
    assert recs[0]["best_val"] == pytest.approx(single.best_val_loss, rel=VAL_LOSS_RTOL)


@pytest.mark.slow
def test_two_gloo_processes_train_one_codetr(tmp_path: Path) -> None:
    pytest.importorskip("mmdet")
    _torchrun(tmp_path, "codetr")
    a, b = (torch.load(tmp_path / f"codetr{r}.pt", weights_only=True) for r in range(2))
    assert _equal_states(a, b)
    recs = [json.loads((tmp_path / f"codetr{r}.json").read_text()) for r in range(2)]
    assert recs[0] == recs[1] and recs[0]["iterations"] == 4  # 4 scans, global batch 2, 2 epochs
    assert (tmp_path / "codetr" / "summary.json").is_file() and (tmp_path / "codetr" / "train_log.jsonl").is_file()


if __name__ == "__main__":
    {"unet": _worker, "codetr": _codetr_worker}[sys.argv[1]](Path(sys.argv[2]))
