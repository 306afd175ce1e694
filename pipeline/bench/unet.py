"""CPU benchmark of the U-Net: inference speed, achieved GFLOP/s vs a dense matmul, training step.

Everything is measured in one run so the numbers share the machine's current load; each
figure is the median of several repetitions. U-Net FLOPs come from
``torch.utils.flop_counter`` (a multiply-add counts 2 FLOPs, as for the matmul). Peak memory of
a training step is the peak RSS of a fresh spawned process (``resource.getrusage``), so
earlier measurements do not inflate it.

Run: ``python -m pipeline.bench.unet [--threads 2] [--profiles cpu paper] [--json out.json]``

The training-step part trains a tiny U-Net for two steps; ``tests/pipeline/bench/test_bench.py`` runs it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch
from torch import nn

from reconstruction.losses import reconstruction_loss
from reconstruction.masking import apply_single_mask
from reconstruction.unet import UNet, UNetConfig, count_parameters, fold_batchnorm
from runtime.device import torch_threads
from runtime.env import setup_environment
from runtime.timing import median_seconds
from runtime.training import seeded_global_rng


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Dense float32 ``torch.matmul`` GFLOP/s (``2 n^3`` FLOPs per product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: torch.matmul(a, b), reps) / 1e9


def unet_flops(config: UNetConfig, size: int = 256) -> int:
    """Forward FLOPs of one ``size x size`` image (convolutions and transposed convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = UNet(config).eval()
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        net(torch.zeros(1, 1, size, size))
    return int(fc.get_total_flops())


def inference_speed(config: UNetConfig, size: int = 256, batch: int = 8, reps: int = 5) -> dict[str, dict[str, float]]:
    """Images/s per variant: plain contiguous, channels-last, channels-last with BN folded in."""
    with seeded_global_rng(0):
        net = UNet(config).eval()
        x = torch.rand(batch, 1, size, size) * 2 - 1
    last = UNet(config).eval().to(memory_format=torch.channels_last)
    last.load_state_dict(net.state_dict())
    x_last = x.contiguous(memory_format=torch.channels_last)
    variants: dict[str, tuple[nn.Module, torch.Tensor]] = {
        "contiguous": (net, x),
        "channels_last": (last, x_last),
        "fused_channels_last": (fold_batchnorm(last).to(memory_format=torch.channels_last), x_last),
    }
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, (m, inp) in variants.items():
            s = median_seconds(functools.partial(m, inp), reps)
            out[name] = {"seconds_per_batch": s, "images_per_s": batch / s}
    return out


def train_step(
    config_dict: dict[str, int], size: int = 256, batch: int = 4, steps: int = 5, threads: int = 2
) -> dict[str, float]:
    """Median seconds of one Adam step (single mask, full loss) and this process's peak RSS."""
    with seeded_global_rng(0):
        net = UNet(UNetConfig.from_dict(config_dict)).train()
        x = torch.rand(batch, 1, size, size) * 2 - 1
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    boxes = torch.tensor([[64.0, 96.0, 192.0, 140.0]] * batch) * size / 256

    def step() -> None:
        loss, _ = reconstruction_loss(net(apply_single_mask(x, boxes)[0]), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch_threads(threads):
        s = median_seconds(step, steps)
    return {
        "seconds_per_step": s,
        "images_per_s": batch / s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _machine(threads: int) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_avg_start": os.getloadavg(),
    }


def _inference(res: dict[str, Any], profiles: Sequence[str], size: int, batch: int, reps: int) -> None:
    """FLOPs, parameters and inference speed of each profile into ``res``."""
    res["inference"], res["flops"], res["params"] = {}, {}, {}
    for p in profiles:
        cfg = UNetConfig.profile(p)
        flops = unet_flops(cfg, size)
        res["flops"][p] = flops
        res["params"][p] = count_parameters(UNet(cfg))
        speed = inference_speed(cfg, size, batch, reps if p != "paper" else min(reps, 2))
        for v in speed.values():
            v["gflops"] = v["images_per_s"] * flops / 1e9
            v["fraction_of_matmul"] = v["gflops"] / res["matmul_gflops"]
        res["inference"][p] = speed


def run_benchmark(
    profiles: Sequence[str] = ("cpu", "paper"),
    size: int = 256,
    batch: int = 8,
    reps: int = 5,
    threads: int = 2,
    train_steps: int = 5,
    train_profiles: Sequence[str] | None = None,
    matmul_n: int = 2048,
    spawn: bool = True,
) -> dict[str, Any]:
    """Measure everything in one run and return a JSON-able dict (see module docstring).

    The paper profile is slow on a CPU, so it gets at most 2 timed repetitions.
    """
    with torch_threads(threads):
        res: dict[str, Any] = {"machine": _machine(threads), "size": size, "batch": batch}
        res["matmul_gflops"] = matmul_gflops(matmul_n, reps)
        _inference(res, profiles, size, batch, reps)
        res["matmul_gflops_end"] = matmul_gflops(matmul_n, reps)  # load drift check
        res["train"] = {}
        for p in train_profiles if train_profiles is not None else profiles[:1]:
            args = (UNetConfig.profile(p).to_dict(), size, 4, train_steps if p != "paper" else min(train_steps, 2))
            if spawn:
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:
                    res["train"][p] = ex.submit(train_step, *args, threads).result()
            else:
                res["train"][p] = train_step(*args, threads)
        res["machine"]["load_avg_end"] = os.getloadavg()
        return res


def main(argv: Sequence[str] | None = None) -> None:
    setup_environment()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", nargs="+", default=["cpu", "paper"])
    ap.add_argument("--train-profiles", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    r = run_benchmark(a.profiles, a.size, a.batch, a.reps, a.threads, train_profiles=a.train_profiles)
    load = r["machine"]["load_avg_start"]
    print(
        f"matmul: {r['matmul_gflops']:.1f} GFLOP/s (end of run {r['matmul_gflops_end']:.1f}), "
        f"threads={a.threads}, load {load}"
    )
    for p, variants in r["inference"].items():
        print(f"{p}: {r['params'][p] / 1e6:.2f} M params, {r['flops'][p] / 1e9:.2f} GFLOP/image")
        for v, m in variants.items():
            print(
                f"  {v:20s} {m['images_per_s']:7.2f} img/s  {m['gflops']:6.1f} GFLOP/s  "
                f"{100 * m['fraction_of_matmul']:5.1f}% of matmul"
            )
    for p, m in r["train"].items():
        print(f"train {p}: {m['seconds_per_step']:.3f} s/step (batch 4), peak RSS {m['peak_rss_mb']:.0f} MB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
