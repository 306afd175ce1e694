"""``python -m pipeline bench``: throughput of every stage on this machine, in one run.

Measures the phantom generator, the U-Net (CPU and paper profiles, GFLOP/s against a dense
``torch.matmul`` measured in the same run), the detectors' inference, and, given a trained
bundle (``--model``), end-to-end ``predict`` images/s with its FLOP-bound ceiling. Medians of
repeated timings are reported; the load average before and after tells whether the machine
was quiet.

Memory: every stage, and every Table 1 peer (``peers``: fit and inference on a small phantom at a tiny
budget), also reports ``peak_rss_mib`` (peak resident memory of the block, :class:`~runtime.timing.PeakRSS`)
and ``rss_rise_mib`` (that peak above the RSS at the block's start). Peaks are per block within one
process: garbage is collected (and freed heap trimmed) before each block, but what the allocator keeps
counts in the next block's start, so compare rises rather than peaks across blocks. Child processes
(the U-Net training step, ``predict``'s decoding workers) are not counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from runtime.device import resolve_device, torch_threads
from runtime.timing import PeakRSS, median_seconds

if TYPE_CHECKING:
    from pipeline.serve.bundle import Bundle
    from scans.records import ScanArrays

T = TypeVar("T")


def _settle() -> None:
    """Collect garbage and give freed heap back to the OS, so a block does not start on the last one's leftovers."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # malloc_trim is glibc's; elsewhere the collect must do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measured(fn: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """``fn()`` and the peak RSS of the call (``peak_rss_mib``, ``rss_rise_mib``), after :func:`_settle`."""
    _settle()
    with PeakRSS() as mem:
        out = fn()
    return out, mem.to_dict()


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
    from pipeline.shared.models import detector_kwargs

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
    from pipeline.serve.predict.driver import predict_folder
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
    from pipeline import registry

    out: dict[str, Any] = {}
    for name in registry.trainable():
        try:
            rate, mem = measured(partial(detector_speed, name, reps=2 if quick else 3, n=8 if quick else 32))
            out[name] = {"images_per_s": rate, **mem}
        except Exception as exc:  # a missing optional stack must not hide the other numbers
            out[name] = {"error": f"{exc.__class__.__name__}: {exc}"}
    rate, mem = measured(lambda: refiner_speed(reps=2 if quick else 3, n=16 if quick else 64))
    out["refiner"] = {
        "images_per_s": rate,
        **mem,
        "note": "box refiner alone, one box per 128-px image, its default passes",
    }
    return out


def bundle_flops(model: Path, n: int = 8) -> dict[str, float]:
    """GFLOP per image of a bundle's :meth:`~pipeline.serve.bundle.Bundle.process` on a batch of ``n`` (convolutions
    and matrix products, as ``torch.utils.flop_counter`` counts them: a multiply-add is 2), in all and by part."""
    from pipeline.serve.bundle import Bundle

    return process_flops(Bundle.load(Path(model), device="cpu"), n)


def process_flops(bundle: Bundle, n: int = 8) -> dict[str, float]:
    """:func:`bundle_flops` of a loaded bundle."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.bench.unet import unet_flops

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
    from pipeline.serve.bundle_file import read_bundle_doc

    e2e, mem = measured(lambda: predict_speed(Path(model), n=16 if quick else 48, reps=2 if quick else 3))
    size = int(read_bundle_doc(Path(model)).image_size)
    gflop = bundle_flops(Path(model))
    return {
        **e2e,
        **mem,
        "image_size": size,
        "gflop_per_image": gflop,
        "unet_gflop_per_image": gflop["unet"],
        "ceiling_images_per_s": matmul_gflops / gflop["total"],
        "unet_ceiling_images_per_s": matmul_gflops / gflop["unet"],
        "note": "ceiling = best matmul GFLOP/s of this run / the bundle's GFLOP per image in process() "
        "(detector, refiner, U-Net and maps; I/O and element-wise work excluded); unet_ceiling: the U-Net alone",
    }


# ----------------------------------------------------------------------------- Table 1 peers
def default_peers() -> list[str]:
    """The peers ``bench`` measures by default, the cheap ones on a CPU: those whose ``default`` budget is a
    single pass (no gradient training: the memory-bank peers), without the prior-guided ``*_box`` variants,
    which fit and run their base peer's model and only cut its map to a box.

    >>> default_peers()
    ['padim', 'patchcore']
    """
    from reconstruction.peers import PEERS
    from reconstruction.peers.prior_guided import uses_prior

    return [n for n in sorted(PEERS) if not uses_prior(n) and PEERS[n].cls.budgets["default"].epochs == 1]


def parse_peers(spec: str | None) -> list[str]:
    """``--peers``: None -> :func:`default_peers`, ``none`` -> [], ``all`` -> every registered peer, ``table1``
    -> every one but the prior-guided variants, else comma-separated registered names (an unknown one
    raises with the choices).

    >>> parse_peers("none"), parse_peers("PatchCore, padim")
    ([], ['patchcore', 'padim'])
    """
    from reconstruction.peers import PEERS, peer_spec
    from reconstruction.peers.prior_guided import uses_prior

    if spec is None:
        return default_peers()
    key = spec.strip().lower()
    if key in ("none", ""):
        return []
    if key == "all":
        return sorted(PEERS)
    if key == "table1":
        return [n for n in sorted(PEERS) if not uses_prior(n)]
    return list(dict.fromkeys(peer_spec(name).name for name in key.split(",") if name.strip()))


def phantom_arrays(n: int = 16, size: int = 128, seed: int = 0) -> ScanArrays:
    """``n`` phantom scans of ``size`` px in memory, every third distended (the supervised peer needs both)."""
    from scans.phantom import render_scan, sample_anatomy
    from scans.records import ScanArrays

    rng = np.random.default_rng(seed)
    scans = [render_scan(rng, sample_anatomy(rng), 0.6 if i % 3 == 2 else 0.0, size) for i in range(n)]
    return ScanArrays(
        images=np.stack([s.image for s in scans]).astype(np.float32),
        boxes=np.array([s.box for s in scans], np.float32),
        masks=np.stack([s.pocket for s in scans]).astype(bool),
        labels=np.array([int(i % 3 == 2) for i in range(n)], np.int64),
        ids=np.arange(n),
        patients=[f"p{i}" for i in range(n)],
        scale=np.ones((n, 2), np.float32),
    )


def peer_speed(name: str, arrays: ScanArrays, reps: int = 2, steps: int = 2) -> dict[str, Any]:
    """Fit seconds, inference images/s and the peak RSS of fit and of inference of one peer on ``arrays``.

    The budget is the peer's ``default`` one (batch size, work size) cut to one epoch of ``steps`` batches:
    fit memory is that of a real fit's batches, fit time only that of this tiny fit.
    """
    from pipeline.config import load_config
    from pipeline.experiment.compare_peers import resolved_budget
    from reconstruction.peers import build_peer, peer_spec
    from reconstruction.peers.prior_guided import predict_peer

    spec = peer_spec(name)
    peer = build_peer(spec.name, seed=0, device=resolve_device(load_config(None, "default", []).device))
    budget = replace(resolved_budget(peer, "default", arrays.images.shape[-1]), epochs=1, steps_per_epoch=steps)
    train = arrays if spec.supervised else arrays.subset(np.flatnonzero(arrays.labels == 0))
    t0 = time.perf_counter()
    record, fit_mem = measured(lambda: peer.fit(train, None, budget))
    fit_seconds = time.perf_counter() - t0
    n = len(arrays)
    rate, predict_mem = measured(
        lambda: _rate(lambda: len(predict_peer(peer, arrays.images, arrays.boxes).scores), n, reps)
    )
    return {
        "fit_seconds": round(fit_seconds, 3),
        "fit_steps": record.get("steps"),
        "images_per_s": rate,
        **{f"fit_{k}": v for k, v in fit_mem.items()},
        **{f"predict_{k}": v for k, v in predict_mem.items()},
        "budget": budget.to_dict(),
        "train_images": len(train),
        "images": n,
        "size": int(arrays.images.shape[-1]),
    }


def peer_speeds(names: Sequence[str], n: int = 16, size: int = 128, reps: int = 2) -> dict[str, Any]:
    """:func:`peer_speed` of every peer in ``names`` on one phantom of ``n`` scans of ``size`` px, one at a time."""
    arrays = phantom_arrays(n, size)
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = peer_speed(name, arrays, reps=reps)
        except Exception as exc:  # one peer's missing stack must not hide the others
            out[name] = {"error": f"{exc.__class__.__name__}: {exc}"}
        _settle()  # the next peer starts without this one's garbage
    return out


# ----------------------------------------------------------------------------- the whole run
def _unet_stage(quick: bool) -> dict[str, Any]:
    """The U-Net benchmark with the peak RSS of its in-process part (inference and matmul)."""
    from pipeline.bench.unet import run_benchmark

    res, mem = measured(
        lambda: run_benchmark(
            profiles=("tiny",) if quick else ("cpu", "paper"),
            reps=2 if quick else 5,
            train_steps=2 if quick else 5,
            threads=os.cpu_count() or 2,
        )
    )
    note = "peak RSS of inference and matmul in this process; the training step's is train[profile].peak_rss_mb"
    return {**res, **mem, "rss_note": note}


def run_bench(quick: bool = False, model: Path | None = None, peers: Sequence[str] | None = None) -> dict[str, Any]:
    """Every measurement of ``python -m pipeline bench`` (``model``: also end-to-end predict; ``peers``: the
    Table 1 peers to fit and run, None: :func:`default_peers`)."""
    from pipeline.provenance import machine, package_versions

    res: dict[str, Any] = {"machine": machine(), "versions": package_versions(), "load_avg_start": os.getloadavg()}
    with torch_threads(1):
        rate, res["phantom_memory"] = measured(lambda: phantom_speed(reps=2 if quick else 3))
        res["phantom_images_per_s_one_thread"] = rate
    res["unet"] = _unet_stage(quick)
    res["detectors"] = _detector_speeds(quick)
    if model is not None:
        matmul = max(res["unet"]["matmul_gflops"], res["unet"].get("matmul_gflops_end", 0.0))
        res["predict"] = _predict_ceiling(model, quick, matmul)
    else:
        res["predict"] = {"note": "pass --model MODEL_DIR (from `train`) to measure end-to-end predict images/s"}
    names = default_peers() if peers is None else list(peers)
    res["peers"] = peer_speeds(names, n=8 if quick else 16, size=64 if quick else 128) if names else {}
    if names:
        res["peers_note"] = (
            "each peer fitted on the phantom's normal scans (both classes if supervised) at its default batch and "
            "work size for one epoch of at most 2 batches: fit_seconds is not a training time; predict on all scans"
        )
    res["load_avg_end"] = os.getloadavg()
    return res


def _row(label: str, speed: str, mem: dict[str, Any], prefix: str = "") -> str:
    peak, rise = (mem.get(prefix + k, float("nan")) for k in ("peak_rss_mib", "rss_rise_mib"))
    return f"{label:28s} {speed:>26s} {peak:9.1f} {rise:9.1f}"


def _unet_speed(unet: dict[str, Any]) -> str:
    """The best variant's images/s of every U-Net profile (the matmul rate when there is none)."""
    best = {p: max(v["images_per_s"] for v in variants.values()) for p, variants in unet.get("inference", {}).items()}
    cells = [f"{p} {rate:.1f}" for p, rate in best.items()]
    return f"{', '.join(cells)} img/s" if cells else f"{unet['matmul_gflops']:.1f} GFLOP/s matmul"


def _peer_rows(peers: dict[str, Any]) -> list[str]:
    """Two table rows a peer (fit, predict), or its error."""
    lines = []
    for name, row in peers.items():
        if "error" in row:
            lines.append(f"{'peer ' + name:28s} {row['error']}")
            continue
        steps = f"{row['fit_steps']} steps" if row["fit_steps"] else "one pass"
        lines.append(_row(f"peer {name} fit", f"{row['fit_seconds']:.1f} s ({steps})", row, "fit_"))
        lines.append(_row(f"peer {name} predict", f"{row['images_per_s']:.1f} img/s", row, "predict_"))
    return lines


def table_lines(res: dict[str, Any]) -> list[str]:
    """A readable table of :func:`run_bench`'s result: every stage's speed beside its peak RSS and rise (MiB)."""
    lines = [f"{'stage':28s} {'speed':>26s} {'peak MiB':>9s} {'rise MiB':>9s}"]
    lines.append(
        _row("phantom (1 thread)", f"{res['phantom_images_per_s_one_thread']:.1f} img/s", res["phantom_memory"])
    )
    lines.append(_row("U-Net (inference, matmul)", _unet_speed(res["unet"]), res["unet"]))
    for name, row in res["detectors"].items():
        speed = row.get("error", "")[:26] or f"{row['images_per_s']:.1f} img/s"
        lines.append(_row(f"detector {name}", speed, row))
    if "images_per_s" in res["predict"]:
        lines.append(_row("predict (end to end)", f"{res['predict']['images_per_s']:.1f} img/s", res["predict"]))
    return lines + _peer_rows(res["peers"])
