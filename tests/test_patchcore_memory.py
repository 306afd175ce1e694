"""PatchCore's coreset selection keeps its memory bounded (issue 28, "Hardening, round two", case 16).

anomalib 2.7's ``KCenterGreedy`` allocates a fresh ``n x k`` float32 difference (``features - center``)
at every greedy step. For the banks of a 240-image phantom fold (29440 patches of 152 features, k = 254
projected dimensions: 29.9 MB, just under glibc's 32 MiB ceiling of its dynamic mmap threshold) those
temporaries come from the brk heap, and small allocations made between steps (tqdm's refresh, the index
tensors it keeps) split each freed block, so the next step's 29.9 MB cannot reuse it and the heap grows by
one block per step: resident memory rose by gigabytes within seconds until the kernel killed the run.
The peer now runs its own k-center greedy (:func:`reconstruction.peers.anomalib_peers.k_center_greedy`)
on buffers allocated once, so the step allocates nothing large and its peak is the bank and its projection.

The memory test runs the peer's bank step in a child process (its own heap, an address-space cap, one
torch thread) on a bank of the failing shape loaded from disk, batch by batch as the fit stores it, and
holds its resident growth to the bank's copy, its projection and one chunk: 37 MiB with the fix, 123 to
176 MiB with anomalib's sampler (which ran away to the cap in some seeds), for a bound of 62 MiB. Two seeds,
since the old sampler's heap depended on the random projection drawn. The other tests pin the picks to
anomalib's (duplicate and blank banks included) and count the sampler's large allocations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from reconstruction.peers.anomalib_peers import k_center_greedy

ROOT = Path(__file__).resolve().parents[1]
N_PATCHES, N_FEATURES = 29440, 152  # fold 0 of the 240-image phantom: 115 scans x 16 x 16 patches, 40 + 112 channels
PER_BATCH = 8 * 256  # the peer's default batch of 8 scans at 128 px: one stored embedding per batch
RATIO = 0.02  # 588 greedy steps: the old sampler's growth shows within ~100; the default 0.1 only takes longer
SEEDS = [1, 2]  # whether the old sampler's heap ran away depended on the projection drawn and the heap's past
PROJECTED = 254  # anomalib's Johnson-Lindenstrauss dimension for 29440 samples at eps 0.9
# the bank's copy (17 MiB) and its projection (28.5 MiB), each allocated once, a 4 MiB difference chunk and room
# for the allocator; anomalib's sampler also holds a full n x k difference (28.5 MiB) and, its freed blocks
# unusable, grew by 120 MiB (in this test) to gigabytes (in the failing runs)
GROWTH_BOUND_MIB = N_PATCHES * (N_FEATURES + PROJECTED) * 4 / 2**20 + 16
HEADROOM = 2_000_000_000  # the child's address space beyond what it holds before the step: fail fast, not swap

CHILD = textwrap.dedent(
    """
    import json, resource, sys, threading, time, warnings
    warnings.simplefilter("ignore")
    import numpy as np, torch
    from reconstruction.peers import build_peer

    bank_file, ratio = sys.argv[1], float(sys.argv[3])
    per_batch, headroom, seed = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    peer = build_peer("patchcore", coreset_ratio=ratio)
    peer.net = peer._build(128)
    bank = torch.load(bank_file)
    peer.net.embedding_store.extend(bank.split(per_batch))  # as the peer's fit stores it, batch by batch
    del bank
    cap = status("VmSize") + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    base, peak, done = status("VmRSS"), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], status("VmRSS"))
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    torch.manual_seed(seed)
    np.random.seed(seed)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            record, error = peer._fit_bank(), None
    except (MemoryError, RuntimeError) as e:
        record, error = None, str(e)[:200]
    done.set()
    peak[0] = max(peak[0], status("VmRSS"))
    print(json.dumps({"growth_mib": (peak[0] - base) / 2**20, "seconds": time.perf_counter() - t0,
                      "record": record, "error": error}))
    """
)


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("patchcore") / "bank.pt"
    gen = torch.Generator().manual_seed(0)
    torch.save(torch.randn(N_PATCHES, N_FEATURES, generator=gen), path)
    return path


@pytest.mark.parametrize("seed", SEEDS)
def test_coreset_step_memory_is_bounded(bank_file: Path, seed: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(bank_file), str(PER_BATCH), str(RATIO), str(HEADROOM), str(seed)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["error"] is None, f"the coreset step ran out of its {HEADROOM / 1e9:.0f} GB headroom: {res}"
    assert res["record"]["memory_bank"] == int(N_PATCHES * RATIO)
    assert res["growth_mib"] < GROWTH_BOUND_MIB, res


def _anomalib_indices(bank: torch.Tensor, ratio: float, seed: int) -> list[int]:
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

    torch.manual_seed(seed)
    np.random.seed(seed)
    return KCenterGreedy(bank, ratio).select_coreset_idxs()


def _banks() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    dup = torch.randn(40, 24, generator=gen)[torch.randint(0, 40, (1200,), generator=gen)]  # 40 distinct patches
    return {
        "bank": torch.randn(3000, 152, generator=gen),
        "narrow": torch.randn(1000, 40, generator=gen),
        "duplicates": dup,  # fewer distinct patches than the coreset keeps: distances reach zero, ties everywhere
        "blank": torch.zeros(500, 8),  # one patch repeated (a blank background)
    }


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("name", ["bank", "narrow", "duplicates", "blank"])
def test_same_coreset_as_anomalib(seed: int, name: str) -> None:
    bank = _banks()[name]
    expected = _anomalib_indices(bank, 0.1, seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    got = k_center_greedy(bank, 0.1, chunk_rows=256)  # several chunks per step
    assert got.tolist() == expected
    torch.manual_seed(seed)
    np.random.seed(seed)
    assert k_center_greedy(bank, 0.1).tolist() == expected  # default chunking: one chunk here


def test_empty_coreset_refused() -> None:
    with pytest.raises(ValueError, match="coreset"):
        k_center_greedy(torch.randn(5, 8), 0.1)  # fewer than one sample to keep, as anomalib refuses


def test_sampler_builds_no_graph_and_allocates_nothing_per_step() -> None:
    """Only the setup allocates tensors of the bank's length; the greedy steps allocate none (anomalib: one each)."""
    from torch.profiler import ProfilerActivity, profile

    bank = torch.randn(4000, 64, requires_grad=True)  # a bank that would record an autograd graph
    torch.manual_seed(0)
    np.random.seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        idx = k_center_greedy(bank, 0.05)  # 200 steps
    assert not idx.requires_grad and idx.dtype == torch.long and idx.shape == (200,)
    big = [e for e in prof.events() if e.cpu_memory_usage >= 4000 * 8]  # >= two floats per patch
    assert len(big) < 20, [(e.name, e.cpu_memory_usage) for e in big][:20]
