"""``python -m pipeline bench``: throughput of every stage on this machine, in one run.

Measures the phantom generator, the U-Net (CPU and paper profiles, GFLOP/s against a dense
``torch.matmul`` measured in the same run), the detectors' inference, and, given a trained
bundle (``--model``), end-to-end ``predict`` images/s with its FLOP-bound ceiling. Medians of
repeated timings are reported; the load average before and after tells whether the machine
was quiet.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scans.runtime import median_seconds, resolve_device, torch_threads

if TYPE_CHECKING:
    from pipeline.bundle import Bundle


def _rate(fn: Callable[[], int], n: int, reps: int) -> float:
    """Items per second of ``fn`` (which handles ``n`` items): ``n`` over its median time, after a warm-up."""
    return n / median_seconds(fn, repeats=reps, warmup=1)


def phantom_speed(reps: int = 3, n: int = 20, size: int = 256) -> float:
    from scans.phantom import render_scan, sample_anatomy

    def go() -> int:
        rng = np.random.default_rng(0)
        anatomy = sample_anatomy(rng)
        for i in range(n):
            render_scan(rng, anatomy, 0.5 if i % 2 else 0.0, size)
        return n

    return _rate(go, n, reps)


def detector_speed(name: str, reps: int = 3, n: int = 32, size: int = 256) -> float:
    """Inference images/s of an untrained detector of the default config (speed does not depend on training)."""
    from detectors.base import build_detector
    from pipeline.config import detector_config_path, load_config
    from pipeline.fit import detector_kwargs

    cfg = load_config(None, "default", [f"detector.name={name}"])
    path = detector_config_path(name, cfg.detector.config, cfg.profile)
    det = build_detector(name, **detector_kwargs(cfg.detector, path, cfg.seed, resolve_device(cfg.device)))
    if hasattr(det, "init_untrained"):  # some detectors build their network at fit, others at construction
        det.init_untrained()
    images = np.random.default_rng(0).random((n, size, size), dtype=np.float32)
    return _rate(lambda: len(det.predict(images)), n, reps)


def refiner_speed(reps: int = 3, n: int = 64, size: int = 128) -> float:
    """Images/s of the box refiner on one box per image (untrained: speed does not depend on training)."""
    from detectors.refine import BoxRefiner
    from pipeline.config import load_config

    ref = BoxRefiner(**load_config(None, "default", []).detector.refiner)
    images = np.random.default_rng(0).random((n, size, size), dtype=np.float32)
    boxes = np.tile(np.array([[0.2, 0.4, 0.75, 0.6]], np.float32) * size, (n, 1))
    return _rate(lambda: len(ref.refine(images, boxes)), n, reps)


def predict_speed(model: Path, n: int = 48, reps: int = 3) -> dict[str, Any]:
    """End-to-end ``predict`` (read, detect, reconstruct, map, segment, write) on phantom PNGs."""
    from pipeline.predict import predict_folder
    from scans.phantom import default_dataset

    src = sorted((default_dataset(progress=False) / "images").glob("*.png"))[:n]
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for p in src:
            shutil.copy(p, folder / p.name)
        for r in range(reps + 1):
            out = Path(tmp) / f"out{r}"
            stats = predict_folder(model, folder, out, progress=False)
            if r:  # the first run warms up
                rates.append(stats["images_per_s"])
    return {"images_per_s": float(statistics.median(rates)), "images": len(src), "reps": reps}


def _detector_speeds(quick: bool) -> dict[str, Any]:
    """Inference images/s of every trainable registered detector, and of the box refiner."""
    from pipeline import sources

    out: dict[str, Any] = {}
    for name in sources.trainable():
        try:
            out[name] = {"images_per_s": detector_speed(name, reps=2 if quick else 3, n=8 if quick else 32)}
        except Exception as exc:  # a missing optional stack must not hide the other numbers
            out[name] = {"error": f"{exc.__class__.__name__}: {exc}"}
    out["refiner"] = {
        "images_per_s": refiner_speed(reps=2 if quick else 3, n=16 if quick else 64),
        "note": "box refiner alone, one box per 128-px image, its default passes",
    }
    return out


def bundle_flops(model: Path, n: int = 8) -> dict[str, float]:
    """GFLOP per image of a bundle's :meth:`~pipeline.bundle.Bundle.process` on a batch of ``n`` (convolutions
    and matrix products, as ``torch.utils.flop_counter`` counts them: a multiply-add is 2), in all and by part."""
    from pipeline.bundle import Bundle

    return process_flops(Bundle.load(Path(model), device="cpu"), n)


def process_flops(bundle: Bundle, n: int = 8) -> dict[str, float]:
    """:func:`bundle_flops` of a loaded bundle."""
    from torch.utils.flop_counter import FlopCounterMode

    from reconstruction.benchmark import unet_flops

    images = np.random.default_rng(0).random((n, bundle.image_size, bundle.image_size), dtype=np.float32)
    parts, bundle.parts = bundle.parts, 1  # the counter sees only its own thread, not process()'s workers

    def gflop(fn: Callable[[], object]) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / n / 1e9

    try:
        return {
            "total": gflop(lambda: bundle.process(images)),
            "detector": gflop(lambda: bundle.detector.predict(images)),  # with its box refiner, if any
            "unet": unet_flops(bundle.unet.config, bundle.image_size) / 1e9,
        }
    finally:
        bundle.parts = parts


def _predict_ceiling(model: Path, quick: bool, matmul_gflops: float) -> dict[str, Any]:
    """End-to-end predict images/s of a bundle, with its FLOP-bound ceilings."""
    import json

    e2e = predict_speed(Path(model), n=16 if quick else 48, reps=2 if quick else 3)
    size = int(json.loads((Path(model) / "bundle.json").read_text())["image_size"])
    gflop = bundle_flops(Path(model))
    return {
        **e2e,
        "image_size": size,
        "gflop_per_image": gflop,
        "unet_gflop_per_image": gflop["unet"],
        "ceiling_images_per_s": matmul_gflops / gflop["total"],
        "unet_ceiling_images_per_s": matmul_gflops / gflop["unet"],
        "note": "ceiling = best matmul GFLOP/s of this run / the bundle's GFLOP per image in process() "
        "(detector, refiner, U-Net and maps; I/O and element-wise work excluded); unet_ceiling: the U-Net alone",
    }


def run_bench(quick: bool = False, model: Path | None = None) -> dict[str, Any]:
    """Every measurement of ``python -m pipeline bench`` (``model``: also end-to-end predict)."""
    from pipeline.provenance import machine, package_versions
    from reconstruction.benchmark import run_benchmark

    reps = 2 if quick else 5
    res: dict[str, Any] = {"machine": machine(), "versions": package_versions(), "load_avg_start": os.getloadavg()}
    with torch_threads(1):
        res["phantom_images_per_s_one_thread"] = phantom_speed(reps=2 if quick else 3)
    res["unet"] = run_benchmark(
        profiles=("tiny",) if quick else ("cpu", "paper"),
        reps=reps,
        train_steps=2 if quick else 5,
        threads=os.cpu_count() or 2,
    )
    res["detectors"] = _detector_speeds(quick)
    if model is not None:
        matmul = max(res["unet"]["matmul_gflops"], res["unet"].get("matmul_gflops_end", 0.0))
        res["predict"] = _predict_ceiling(model, quick, matmul)
    else:
        res["predict"] = {"note": "pass --model MODEL_DIR (from `train`) to measure end-to-end predict images/s"}
    res["load_avg_end"] = os.getloadavg()
    return res
