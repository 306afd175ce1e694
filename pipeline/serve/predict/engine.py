"""What processes a run's planned frames: a frozen :class:`Job` (the run's fixed inputs, which no engine
changes), the :class:`Engine` protocol, the default :data:`local_engine` (this process runs the model, with
DataLoader workers decoding ahead) and :func:`process_batch`, which the Ray engine's actors
(:mod:`pipeline.serve.predict.ray_engine`) run on the items they are given."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.serve.bundle import Bundle
from pipeline.serve.predict.inputs import Batch, FrameDataset, Item, Plan, load_frame, read_batches, read_stream
from pipeline.serve.predict.options import Outputs, ReadOptions
from pipeline.serve.predict.writer import Sink, write_outputs
from runtime.timing import Stopwatch

Rows = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # predictions.csv rows, errors.csv rows


def _predict_batch(bundle: Bundle, folder: Path, out: Path, batch: Batch, opts: ReadOptions, outputs: Outputs) -> Rows:
    """Predict the frames read into ``batch`` and write their outputs; returns its CSV rows and error rows."""
    if not batch.items:
        return [], batch.errors
    result = bundle.process(np.stack(batch.images))
    rows, late = write_outputs(folder, out, bundle, batch, result, opts, outputs)
    return rows, batch.errors + late


def process_batch(
    bundle: Bundle, folder: Path, out: Path, items: Sequence[Item], opts: ReadOptions, outputs: Outputs
) -> Rows:
    """Read (in this process), predict and write the output files of ``items``; returns their CSV rows
    and error rows."""
    batch = Batch()
    for item in items:
        batch.add(load_frame(item, opts, bundle.image_size, outputs.draws))
    return _predict_batch(bundle, folder, out, batch, opts, outputs)


@dataclass(frozen=True)
class Job:
    """One run's fixed inputs, as an :class:`Engine` sees them. ``bundle`` is the driver's loaded copy,
    None for an engine whose workers load their own (``needs_local_bundle`` false); ``workers`` and
    ``prefetch`` are the local engine's decoding processes and the frames each reads ahead; ``backend``
    what runs the bundle (``torch`` or ``onnxruntime``)."""

    bundle_dir: Path
    device: str
    folder: Path
    out: Path
    opts: ReadOptions
    outputs: Outputs
    batch_size: int
    progress: bool
    bundle: Bundle | None
    workers: int = 0
    prefetch: int = 2
    backend: str = "torch"


class Engine(Protocol):
    """Processes a run's pending frames into the sink it returns (closed), timing the work as "predict".
    ``needs_local_bundle``: whether the :class:`Job` must hold the driver's loaded bundle (false when
    the engine's workers load their own, so the driver keeps no model in memory)."""

    @property
    def needs_local_bundle(self) -> bool: ...

    def __call__(self, job: Job, plan: Plan, watch: Stopwatch) -> Sink: ...


class LocalEngine:
    """The default :class:`Engine`: this process runs the model one batch at a time as the folder is
    listed, with ``job.workers`` DataLoader processes decoding the next frames meanwhile."""

    needs_local_bundle = True

    def __call__(self, job: Job, plan: Plan, watch: Stopwatch) -> Sink:
        if job.bundle is None:
            raise ValueError("the local engine runs the job's own bundle, and this job has none")
        sink = Sink(job.out, job.progress, plan.total)
        dataset = FrameDataset(job.opts, job.bundle.image_size, keep_image=job.outputs.draws)
        stream = read_stream(plan.work, dataset, job.workers, job.prefetch)
        try:
            sink.write([], plan.listing_errors, 0)
            with watch("predict"):
                for batch in read_batches(stream, job.batch_size):
                    advance = len(batch)
                    rows, errors = _predict_batch(job.bundle, job.folder, job.out, batch, job.opts, job.outputs)
                    sink.write(rows, errors, advance)
        finally:
            stream.close()  # stops the DataLoader's workers
            sink.close()
        return sink


local_engine = LocalEngine()
