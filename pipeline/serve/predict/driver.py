"""Batch processing of a new scan folder with a trained bundle (``python -m pipeline predict``).

Every image is read with :func:`scans.readers.read_scan`: DICOMs are cropped to their B-mode
ultrasound region (``crop="regions"``, the default, acts only when a file has one; ``"auto"``
also finds the region from the pixels; ``"none"`` never crops), the model runs on the crop, and
the box and mask are mapped back to the scan's own pixels. Cine files give one frame
(``frames="first"``, a frame number) or one row per frame (``"all"``).

It writes ``predictions.csv`` (keyed by file path and frame, with the SOP Instance UID, the image
``score``, its calibrated ``probability`` of distension (the bundle's ``calibration``, fitted on its
validation part; empty for a bundle without one), the ``verdict`` (``score`` against ``threshold``),
the crop and the mask as a COCO compressed RLE string in ``mask_rle``, in the scan's own pixels, read
back with :func:`pipeline.serve.predict.csv_rows.decode_mask`; no mask images are written;
``orientation``, the EXIF Orientation a JPEG's pixels were turned by before anything else, 1 when none),
``errors.csv``, ``predict.json`` (the bundle and shard that made the folder) and the review page
(:mod:`pipeline.serve.review`); ``overlays=True`` adds ``overlays/<name>.png`` (else the ``overlay``
column is empty), and ``dicom_out`` SEG/SR/SC objects under ``dicom/`` (:mod:`pipeline.serve.dicom_out`).
No patient tag reaches the CSV, PNG or HTML outputs (docs/design.md, "Outputs for clinicians and PACS").

Archive scale: frames are decoded by ``workers`` DataLoader processes while the model runs;
``shard=(k, n)`` keeps the files whose path hash is ``k`` modulo ``n``
(:func:`pipeline.serve.predict.inputs.shard_of`), so ``n`` runs share an archive, and
:func:`pipeline.serve.merge.merge_outputs` (``python -m pipeline merge``) joins their folders into one.

One bad file never stops the batch (:mod:`pipeline.serve.predict.inputs`): it goes to ``errors.csv``
with the reason. Rows are appended and flushed per batch, images are written atomically, and a rerun
skips what ``predictions.csv`` and ``errors.csv`` already hold. The output folder is locked while a
process writes it (:func:`pipeline.serve.predict.manifest.output_lock`), and a rerun with another
bundle, shard or setting is refused (:func:`pipeline.serve.predict.manifest.check_resume`).

The parts: :mod:`~pipeline.serve.predict.options` (every setting and its default),
:mod:`~pipeline.serve.predict.inputs`, :mod:`~pipeline.serve.predict.engine`,
:mod:`~pipeline.serve.predict.writer`, :mod:`~pipeline.serve.predict.csv_rows` and
:mod:`~pipeline.serve.predict.manifest`; this module runs them in order.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.serve.bundle import Bundle
from pipeline.serve.predict.engine import Engine, Job, local_engine
from pipeline.serve.predict.inputs import check_paths, default_workers, plan_work
from pipeline.serve.predict.manifest import MANIFEST, check_resume, make_manifest, output_lock
from pipeline.serve.predict.options import PredictOptions, ReadOptions, Shard, parse_frames
from pipeline.serve.predict.writer import Sink
from runtime.io import atomic_write_text, confined
from runtime.timing import Stopwatch
from scans.readers import CROP_MODES


def make_engine(options: PredictOptions) -> Engine:
    """The engine ``options.engine`` names (here, not in ``engine``, which the Ray engine imports); refuses
    a pair of engine and backend that cannot run, and
    ``ray`` without Ray Data installed, before anything is read or written."""
    options.check_engine()
    if options.engine != "ray":
        return local_engine
    if not all(importlib.util.find_spec(m) for m in ("ray", "pyarrow")):
        raise RuntimeError("--engine ray needs Ray Data: pip install 'ray[data]'")
    from pipeline.serve.predict.ray_engine import RayEngine

    return RayEngine(options.actors, address=options.ray_address)


def predict_folder(
    bundle_dir: Path,
    folder: Path,
    out: Path,
    options: PredictOptions | None = None,
    *,
    engine: Engine | None = None,
    **keywords: Any,
) -> dict[str, Any]:
    """Process every file of ``folder`` (or its ``shard``) as ``options`` say; returns counts and
    throughput. Resumes a killed run.

    ``engine``: what processes the frames (default: the one ``options.engine`` names, the local
    engine or :class:`pipeline.serve.predict.ray_engine.RayEngine`'s Ray Data actors). Without
    ``options``, the settings come as keywords, as before :class:`PredictOptions` existed:
    ``recursive``, ``batch_size``, ``device``, ``progress``, ``read`` (crop mode, region, frames and
    pixel limit, a :class:`ReadOptions`), ``dicom_out`` (the DICOM kinds ``seg``, ``sr``, ``sc``
    written under ``out/dicom/`` for DICOM inputs), ``review`` (write the review page at the end;
    its path is ``stats["review"]``), ``overlays`` (also write ``overlays/<name>.png``), ``shard``
    (``(k, n)`` or ``"k/n"``, this run's share of the files), ``workers`` (default:
    :func:`pipeline.serve.predict.inputs.default_workers`) and ``prefetch`` (the local engine's
    decoding processes and frames read ahead by each), ``runtime`` (the backend: ``torch``,
    :meth:`Bundle.load`, or ``onnxruntime``, ``pipeline.serve.onnx_bundle.load_onnx_bundle``).
    """
    if options is None:
        options = PredictOptions.from_keywords(**keywords)
    elif keywords:
        raise TypeError(f"predict_folder() takes options or keywords, not both ({', '.join(sorted(keywords))})")
    engine = make_engine(options) if engine is None else engine
    return _run(Path(bundle_dir), Path(folder), Path(out), options, engine)


def _run(bundle_dir: Path, folder: Path, out: Path, options: PredictOptions, engine: Engine) -> dict[str, Any]:
    """:func:`predict_folder` once its options are known."""
    opts = _validate(folder, out, options)
    part, n_workers = _run_options(options)
    with output_lock(out):  # one process at a time writes out
        bundle = _load_bundle(bundle_dir, options.device, options.backend)  # a damaged bundle is named before any work
        job = Job(
            bundle_dir=bundle_dir,
            device=options.device,
            folder=folder,
            out=out,
            opts=opts,
            outputs=options.outputs,
            batch_size=options.batch_size,
            progress=options.progress,
            bundle=bundle if getattr(engine, "needs_local_bundle", True) else None,
            workers=n_workers,
            prefetch=options.prefetch,
            backend=options.backend,
        )
        manifest = make_manifest(job, bundle, part)
        done = check_resume(out, manifest)  # refused before anything is written
        atomic_write_text(confined(out, MANIFEST), json.dumps(manifest, indent=1) + "\n")
        plan = plan_work(folder, options.recursive, opts, bundle.frame, part, done)
        del bundle  # only the job keeps it, and only for an engine that runs it here
        watch = Stopwatch()
        sink = engine(job, plan, watch)
        return _finish(out, sink, watch.seconds.get("predict", 0.0), plan.n_done, options.review)


def _validate(folder: Path, out: Path, options: PredictOptions) -> ReadOptions:
    """Refuse bad settings before anything is loaded or written; returns the read options with the frames parsed."""
    from pipeline.serve.dicom_out import KINDS

    opts = options.read
    if options.batch_size < 1:
        raise ValueError(f"batch size must be 1 or more, not {options.batch_size}")
    if opts.crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, not {opts.crop!r}")
    if opts.region is not None and (opts.crop == "none" or opts.region < 0):
        raise ValueError(f"--region {opts.region}: needs --crop regions or auto, and an index of 0 or more")
    if opts.max_pixels < 1:
        raise ValueError(f"the pixel limit must be positive, not {opts.max_pixels}")
    unknown = sorted(set(options.dicom_out) - set(KINDS))
    if unknown:
        raise ValueError(f"--dicom-out: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found")
    check_paths(folder, out)
    return replace(opts, frames=parse_frames(opts.frames))


def _run_options(options: PredictOptions) -> tuple[Shard, int]:
    """The run's shard (``(0, 1)``: the whole folder) and decoding processes, checked with its prefetch
    and backend."""
    part = options.shard or (0, 1)
    if not 0 <= part[0] < part[1]:
        raise ValueError(f"shard {part[0]}/{part[1]}: K/N needs 0 <= K < N")
    n_workers = default_workers() if options.workers is None else options.workers
    if n_workers < 0 or options.prefetch < 1:
        raise ValueError(f"workers must be 0 or more and prefetch 1 or more, not {n_workers} and {options.prefetch}")
    options.check_engine()
    return part, n_workers


def _load_bundle(bundle_dir: Path, device: str, backend: str) -> Bundle:
    if backend == "onnxruntime":
        import torch

        # the ONNX Runtime loader is optional; imported by name so the rest works without it.
        # ORT takes torch's thread count, so both backends are measured on the same cores
        loader = importlib.import_module("pipeline.serve.onnx_bundle").load_onnx_bundle
        loaded: Bundle = loader(bundle_dir, device, threads=torch.get_num_threads())
        return loaded
    return Bundle.load(bundle_dir, device=device)


def _finish(out: Path, sink: Sink, seconds: float, n_done: int, review: bool) -> dict[str, Any]:
    page = None
    if review:
        from pipeline.serve.review import write_review

        page = write_review(out)
    stats = _report(seconds, sink.n_ok, sink.n_err, n_done, confined(out, "errors.csv"))
    stats["review"] = page
    return stats


def _report(elapsed: float, n_ok: int, n_err: int, n_done: int, err_csv: Path) -> dict[str, Any]:
    stats = {
        "processed": n_ok,
        "errors": n_err,
        "skipped_already_done": n_done,
        "seconds": elapsed,
        "images_per_s": n_ok / elapsed if elapsed > 0 and n_ok else 0.0,
    }
    print(
        f"predict: {n_ok} image(s) in {elapsed:.1f} s ({stats['images_per_s']:.2f} images/s), "
        f"{n_err} error(s) in {err_csv}, {n_done} already done",
        file=sys.stderr,
    )
    return stats
