"""A trained bundle ready to run (:class:`Bundle`, made by ``train``: :mod:`pipeline.serve.train`).

The bundle folder holds ``bundle.json`` (:class:`pipeline.serve.bundle_file.BundleDoc`), ``detector/``
and ``unet/``. Nothing in it is a pickle: weights load with ``weights_only=True``. The verdict is the
image score against ``score.threshold``; ``calibration`` turns the score into the probability of
distension that ``predict`` writes beside it (:func:`pipeline.shared.calibration.calibrate`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detectors.base import Detector, detector_class
from detectors.prior import PriorPolicy
from detectors.refine import RefinedDetector
from pipeline.serve.bundle_file import BundleDoc, read_bundle_doc
from pipeline.serve.bundle_file import check_bundle_doc as check_bundle_doc  # for callers that check a doc by hand
from pipeline.shared.calibration import calibrate
from pipeline.shared.priors import Expansion, predict_priors
from runtime.device import resolve_device
from runtime.io import CheckpointError


def _tensors(module: Any) -> list[Any]:
    """A module's parameters and buffers (any in-place update bumps one's ``_version``)."""
    return [*module.parameters(), *module.buffers()]


@dataclass
class BundleOutput:
    scores: np.ndarray  # [N]
    boxes: np.ndarray  # [N, 4] in model pixels
    sources: list[str]
    confidences: np.ndarray
    masks: np.ndarray  # [N, S, S] bool
    heat: np.ndarray  # [N, S, S] the segmentation map
    probabilities: np.ndarray  # [N] calibrated probability of distension (calibrate); NaN without a calibration

    @staticmethod
    def concatenate(parts: list[BundleOutput]) -> BundleOutput:
        """The outputs of consecutive parts of a batch as one.

        >>> z = np.zeros(1)
        >>> o = BundleOutput(z, np.zeros((1, 4)), ["a"], z, np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2)), z)
        >>> BundleOutput.concatenate([o, o]).sources
        ['a', 'a']
        """

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        sources = [s for p in parts for s in p.sources]
        fields = ("boxes", "confidences", "masks", "heat", "probabilities")
        boxes, confidences, masks, heat, probabilities = (cat(f) for f in fields)
        return BundleOutput(cat("scores"), boxes, sources, confidences, masks, heat, probabilities)


def _one_torch_thread() -> None:
    """A worker thread's own intra-op thread count: 1 (torch keeps it per thread)."""
    torch.get_num_threads()  # torch's lazy per-thread setup first, or the first op would undo the next line
    torch.set_num_threads(1)


class Bundle:
    """A trained bundle ready for :meth:`process`."""

    # On CPU, process() splits a batch into this many parts run at once, each by its own thread with one
    # torch thread (None: torch's thread count; 1: one part). The detector's and refiner's many small ops
    # and the U-Net's convolutions use cores better side by side than split across threads op by op.
    parts: int | None = None

    def __init__(self, doc: Mapping[str, Any] | BundleDoc, detector: Detector, unet: Any, device: str) -> None:
        spec = doc if isinstance(doc, BundleDoc) else BundleDoc.from_dict(doc)
        # doc: bundle.json's own object (what model_version hashes); spec: the same, typed
        raw = spec.source if spec.source is not None else spec.to_dict()
        self.doc: dict[str, Any] = raw if isinstance(raw, dict) else dict(raw)
        self.spec, self.detector, self.unet, self.device = spec, detector, unet, device
        self.image_size = int(spec.image_size)
        self.frame = int(spec.frame)
        self.score_threshold = float(spec.score.threshold)
        # the score's calibration (fit_calibration), None in a bundle made before it
        self.calibration: Mapping[str, Any] | None = spec.calibration
        p = spec.prior
        x1, y1, x2, y2 = (float(v) for v in p.median_box)
        self.policy = PriorPolicy(float(p.threshold), (x1, y1, x2, y2))
        self.expansion = Expansion(float(p.expand_up), float(p.expand_side))
        # names the model in DICOM results: the detector, and a digest of bundle.json's thresholds and config
        self.model_name = f"LoRIS-{spec.detector}"
        self.model_version = hashlib.sha256(json.dumps(self.doc, sort_keys=True).encode()).hexdigest()[:12]
        self._ready: tuple[tuple[Any, ...], Any] | None = None  # (weights key, prepared U-Net)
        self._pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, their pool) for split batches

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> Bundle:
        from reconstruction.checkpoint import load_model

        directory = Path(directory)
        hint = f"the bundle {directory} is damaged: restore it or train a new one with `train`"
        doc = read_bundle_doc(directory, hint)  # checked before the models load, and before predict claims its --out
        dev = resolve_device(device)
        det_dir = directory / "detector"
        # A refined detector (base + box refiner) says so in refined.json beside the base's files.
        # The bundle uses only the prior (the top box), so only that box is refined.
        try:
            detector = (
                RefinedDetector.load(det_dir, top_k=1)
                if (det_dir / "refined.json").is_file()
                else detector_class(doc.detector).load(det_dir)
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:  # a damaged detector.json, or an unknown detector
            raise ValueError(f"{det_dir}: the bundle's detector cannot be loaded ({exc}); {hint}") from None
        unet, _ = load_model(directory / "unet", map_location=dev, hint=hint)
        bundle = cls(doc, detector, unet, dev)  # read_bundle_doc refused a missing or malformed entry
        cal = bundle.calibration
        if not cal or cal.get("method") != "platt":
            why = cal.get("reason", "none was fitted") if cal else "it was made before bundles were calibrated"
            print(
                f"WARNING: the bundle {directory} has no calibration of its score ({why}): "
                "predictions.csv's probability column is left empty; the verdicts are unchanged",
                file=sys.stderr,
            )
        return bundle

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """``[N]`` calibrated probabilities of distension for image scores (:func:`calibrate`; NaN without one)."""
        return calibrate(scores, self.calibration)

    def _inference_unet(self) -> Any:
        """The U-Net as :func:`reconstruction.infer.reconstruct` runs it (BatchNorm folded, channels-last),
        prepared once and again only when ``unet``, its weights or ``device`` change."""
        from reconstruction.infer import inference_model

        net = self.unet
        key = (id(net), str(self.device), *((id(t), t.data_ptr(), t._version) for t in _tensors(net)))
        if self._ready is None or self._ready[0] != key:
            self._ready = (key, inference_model(net, self.device))
        return self._ready[1]

    def _workers(self, k: int) -> ThreadPoolExecutor:
        """A pool of ``k`` threads of one torch thread each, started now (each sets its count once) and kept."""
        if self._pool is None or self._pool[0] != k:
            if self._pool is not None:
                self._pool[1].shutdown(wait=False)
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(k, thread_name_prefix="loris-bundle", initializer=_one_torch_thread)
            started = threading.Barrier(k)
            for f in [pool.submit(started.wait) for _ in range(k)]:
                f.result()
            # a worker's set_num_threads also changed the count torch gives new threads: put it back
            torch.set_num_threads(threads)
            self._pool = (k, pool)
        return self._pool[1]

    def process(self, images: np.ndarray) -> BundleOutput:
        """Detect, reconstruct, score, calibrate (:func:`calibrate`) and segment a ``[N, S, S]`` batch in [0, 1].

        On CPU the batch is split into :attr:`parts` run at once; each image's numbers do not depend on
        the split (boxes to float32 rounding).
        """
        k = min(self.parts or torch.get_num_threads(), len(images)) if self.device == "cpu" else 1
        if k <= 1:
            return self._process(images)
        self._inference_unet()  # prepared here, once, rather than raced for by the workers
        grad = torch.is_grad_enabled()  # thread-local: the workers follow the caller's mode

        def run(part: np.ndarray) -> BundleOutput:
            with torch.set_grad_enabled(grad):
                return self._process(part)

        pool = self._workers(k)
        futures = [pool.submit(run, part) for part in np.array_split(images, k)]
        return BundleOutput.concatenate([f.result() for f in futures])

    def priors(self, images: np.ndarray) -> Any:
        """The bundle's location priors (detector, fallback, expansion) for a ``[N, S, S]`` batch."""
        from scans.records import ScanArrays

        n = len(images)
        arrays = ScanArrays(
            images=images,
            boxes=np.full((n, 4), np.nan, np.float32),
            masks=np.zeros(images.shape, bool),
            labels=-np.ones(n, np.int64),
            ids=np.arange(n),
            patients=[""] * n,
            scale=np.ones((n, 2), np.float32),
        )
        return predict_priors(self.detector, arrays, self.policy, self.expansion, batch_size=max(n, 1))

    def _process(self, images: np.ndarray) -> BundleOutput:
        """One part of :meth:`process`, in the calling thread."""
        from reconstruction.deviation import image_score
        from reconstruction.infer import reconstruct
        from reconstruction.segment import segment

        pri = self.priors(images)
        d = self.spec
        rec = reconstruct(
            self._inference_unet(),
            images,
            pri.boxes,
            maps=d.maps,
            device=self.device,
            margin=float(d.mask_margin),
            prepared=True,
        )
        s = d.score
        scores = image_score(
            rec.maps[s.map],
            pri.boxes,
            pooling=s.pooling,
            region=s.region,
            topk_fraction=s.topk_fraction,
            margin=float(d.mask_margin),
            inset=float(s.inset),
        )
        g = d.segmentation
        heat = rec.maps[g.map]
        masks = segment(heat, float(g.threshold), kernel=int(g.kernel))
        return BundleOutput(scores, pri.boxes, pri.sources, pri.confidences, masks, heat, self.probabilities(scores))
