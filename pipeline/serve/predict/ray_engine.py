"""Archive-scale ``predict`` on Ray Data (``python -m pipeline predict --engine ray``).

The same inputs, checks and outputs as :func:`pipeline.serve.predict.driver.predict_folder` (``predictions.csv``
with the masks as RLE, ``errors.csv``, ``predict.json``, overlays when asked, DICOM results, the
review page; resumable, and sharded with ``shard``), but the frames to process become a Ray dataset
(``ray.data.from_items`` of paths and frame numbers) mapped by ``actors`` actors of
:class:`BundleActor`, each holding the bundle once. Actors read the scans and write the image files
themselves (atomically); the driver appends the CSV rows as batches come back, so a killed run
resumes as the local engine does. Ray's actors are the parallel readers here, so the local engine's
``workers`` do not apply. Without ``address`` Ray runs on this
machine, with its session files under the LoRIS cache (``ray/``), or, when that path is too long
for Ray's sockets, in a temporary folder removed after the run; that local Ray makes no network call
(:func:`_start_ray`). Paths travel as bytes (:func:`os.fsencode`), so names that are not UTF-8 reach
the actors intact.
Needs the ``ray`` extra (``pip install 'ray[data]'``); the import is deferred so the rest of the
package works without it (docs/design.md, "Outputs for clinicians and PACS").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.serve.bundle import Bundle
from pipeline.serve.predict.engine import Job, process_batch
from pipeline.serve.predict.inputs import Item, Plan
from pipeline.serve.predict.options import Outputs, ReadOptions
from pipeline.serve.predict.writer import Sink
from runtime.timing import Stopwatch


class BundleActor:
    """A Ray Data callable class: loads the bundle once, then processes batches of ``path``/``rel``/``frame``."""

    def __init__(
        self,
        bundle_dir: str,
        device: str,
        folder: str,
        out: str,
        opts: ReadOptions,
        outputs: Outputs,
        threads: int,
    ) -> None:
        from runtime.device import set_threads
        from runtime.env import setup_environment

        setup_environment()  # a Ray worker process: the LoRIS cache for torch's caches, as in the driver
        set_threads(threads)
        self.bundle = Bundle.load(Path(bundle_dir), device=device)
        self.folder, self.out, self.opts, self.outputs = Path(folder), Path(out), opts, outputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # paths come as bytes (os.fsencode), so a name that is not UTF-8 crosses Arrow intact
        items = [
            Item(Path(os.fsdecode(bytes(p))), os.fsdecode(bytes(r)), int(f))
            for p, r, f in zip(batch["path"], batch["rel"], batch["frame"])
        ]
        rows, errors = process_batch(self.bundle, self.folder, self.out, items, self.opts, self.outputs)
        return {
            "kind": np.array(["row"] * len(rows) + ["error"] * len(errors), dtype=object),
            "row": np.array([json.dumps(r) for r in rows + errors], dtype=object),
        }


_SOCKET_ROOM = 40  # Ray's socket paths add ~65 characters to its temp folder, and AF_UNIX allows 107
# Ray's switch for a cluster of one machine (its default on Windows and macOS): read on import, it makes
# every Ray process use the loopback address, not the one found by routing towards a public address
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` for the block (the processes it starts inherit them)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ray_home(temp: Path) -> Path:
    """The ``HOME`` of the Ray processes this driver starts (not of the actors, which keep the user's).

    Ray's API server runs even without the dashboard, and on start it asks the cloud metadata
    servers (169.254.169.254, metadata.google.internal) which cloud it is on, usage statistics on
    or off, unless ``~/ray_bootstrap_config.yaml`` (an autoscaler cluster's config) exists: here it
    does, and is empty, so nothing is asked and nothing of Ray's is written into the user's home.
    """
    home = temp / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    return home


def _start_ray(address: str | None, threads: int) -> tuple[bool, Path | None]:
    """Start (or join) Ray; returns whether this call started it (and so must shut it down), and a
    temporary folder to remove afterwards, if one had to be made.

    A Ray started here makes no network call: no dashboard, no usage statistics
    (``RAY_USAGE_STATS_ENABLED=0`` unless set otherwise) and so no report, no cloud metadata probe
    (:func:`_ray_home`), every process on the loopback address, and no token written into ``~/.ray``.
    Joining a cluster at ``address``, this driver reports no usage statistics either.
    """
    first = address is None and "ray" not in sys.modules and _LOOPBACK_ENV not in os.environ
    with _environ({_LOOPBACK_ENV: "0"} if first else {}):  # read once, when Ray is imported
        import ray

    if ray.is_initialized():
        return False, None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return True, None
    from runtime.env import cache_home

    temp, scratch = cache_home() / "ray", None
    if len(str(temp)) > _SOCKET_ROOM:  # too long for Ray's sockets: a short folder, removed after the run
        temp = scratch = Path(tempfile.mkdtemp(prefix="loris-ray-"))
    temp.mkdir(parents=True, exist_ok=True)
    try:
        from ray._private import ray_constants

        cluster = bool(getattr(ray_constants, "ENABLE_RAY_CLUSTER", True))
    except ImportError:
        cluster = True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a cluster of this machine only: no token in ~/.ray
    home = os.environ.get("HOME")
    # Ray's processes must agree with this driver, which read the loopback switch when it imported Ray
    with _environ({"HOME": str(_ray_home(temp)), _LOOPBACK_ENV: "1" if cluster else "0"}):
        ray.init(
            num_cpus=max(threads, 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"HOME": home}} if home else None,  # the actors keep the user's home
            _temp_dir=str(temp),
        )
    return True, scratch


@dataclass(frozen=True)
class RayEngine:
    """An :class:`pipeline.serve.predict.engine.Engine`: Ray Data with ``actors`` model-holding actors of
    ``threads`` torch threads each, on this machine or the cluster at ``address``. The actors load their
    own bundle, so the driver's job holds none (``needs_local_bundle``) and keeps no model in memory."""

    needs_local_bundle: ClassVar[bool] = False
    actors: int = 1
    threads: int = 1
    address: str | None = None

    def __post_init__(self) -> None:
        if self.actors < 1 or self.threads < 1:
            raise ValueError(f"actors and threads per actor must be 1 or more, not {self.actors} and {self.threads}")

    def __call__(self, job: Job, plan: Plan, watch: Stopwatch) -> Sink:
        if job.backend != "torch":
            raise ValueError(f"the ray engine's actors run the torch bundle, not {job.backend}")
        items: list[Item] = []
        early = list(plan.listing_errors)
        for w in plan.work:
            if isinstance(w, Item):
                items.append(w)
            else:
                early.append(w)
        sink = Sink(job.out, job.progress, len(items) + len(early))
        started, scratch = False, None
        try:
            sink.write([], early, len(early))
            with watch("predict"):
                if items:
                    started, scratch = _start_ray(self.address, self.actors * self.threads)
                    self._map(job, items, sink)
        finally:
            sink.close()
            if started:
                import ray

                ray.shutdown()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        return sink

    def _map(self, job: Job, items: list[Item], sink: Sink) -> None:
        """Map ``items`` over the actor pool, writing each batch's rows to ``sink`` as it comes back."""
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_items(
            [{"path": os.fsencode(i.path), "rel": os.fsencode(i.rel), "frame": i.frame} for i in items]
        )
        kwargs = {
            "bundle_dir": str(job.bundle_dir),
            "device": job.device,
            "folder": str(job.folder),
            "out": str(job.out),
            "opts": job.opts,
            "outputs": job.outputs,
            "threads": self.threads,
        }
        mapped = ds.map_batches(
            BundleActor,
            fn_constructor_kwargs=kwargs,
            batch_size=job.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=self.threads,
        )
        for b in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            decoded = [(k, json.loads(r)) for k, r in zip(b["kind"], b["row"])]
            rows = [r for k, r in decoded if k == "row"]
            errors = [r for k, r in decoded if k == "error"]
            sink.write(rows, errors, len({(r["file"], str(r["frame"])) for _, r in decoded}))
