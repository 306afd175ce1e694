"""A bundle run by onnxruntime (``predict --engine onnxruntime``): :func:`load_onnx_bundle`.

The LoRIS graph (masking, U-Net, anomaly maps, pooled score; :class:`pipeline.serve.onnx_export.LorisGraph`)
and a YOLOv5u detector run as ONNX; the prior policy and the segmentation are :class:`pipeline.serve.bundle.Bundle`'s
own code. Co-DETR (its upstream has no ONNX export; ours is traced at batch 1), the box refiner and any
other detector stay in PyTorch (docs/design.md, "Outputs for clinicians and PACS").

The graphs come from ``BUNDLE/onnx/`` when ``export.json`` is there (``python -m pipeline export
--model BUNDLE --out BUNDLE/onnx``), else from one export into the LoRIS cache
(``<cache>/onnx/bundle-<key>``, keyed by the bundle's files; made once under a lock and published
atomically, a damaged entry is moved aside and exported again). Nothing is written into the bundle.

>>> OnnxBundle.__mro__[1].__name__
'Bundle'
"""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detectors.base import Detector
from detectors.refine import RefinedDetector
from detectors.yolov5 import YoloV5Detector
from pipeline.serve.bundle import Bundle, BundleOutput
from pipeline.serve.bundle_file import BundleDoc
from pipeline.serve.onnx_export import OPSET, export_bundle, export_digest, onnx_session
from pipeline.shared.cache import digest, fit_or_load, publish
from runtime.env import cache_home

USER_EXPORT = "onnx"  # BUNDLE/onnx: where `export --out BUNDLE/onnx` puts a user's own export
_CACHE_VERSION = 1  # part of the cache key: bump when the exported graphs change
_EXTRA = "pip install 'loris[export]'"


def require(*modules: str) -> None:
    """Raise a RuntimeError naming the ``export`` extra when one of ``modules`` is not installed.

    >>> require("json")
    >>> require("no_such_module_xyz")
    Traceback (most recent call last):
    ...
    RuntimeError: the ONNX engine needs no_such_module_xyz: pip install 'loris[export]'
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"the ONNX engine needs {', '.join(missing)}: {_EXTRA}")


class OrtModule(nn.Module):
    """An onnxruntime session as a torch module (one input, one output), standing in for a network."""

    def __init__(self, session: Any, output: str) -> None:
        super().__init__()
        self.session, self.input, self.output = session, session.get_inputs()[0].name, output

    def forward(self, x: Tensor) -> Tensor:
        (y,) = self.session.run([self.output], {self.input: x.detach().cpu().float().numpy()})
        return torch.from_numpy(y)


@dataclass
class OnnxGraphs:
    """The sessions of one export folder (``detector`` is None where the detector stays in PyTorch)."""

    directory: Path
    info: dict[str, Any]  # export.json
    loris: Any
    detector: Any | None


def _typed(doc: BundleDoc | Mapping[str, Any]) -> BundleDoc:
    """``doc`` as a :class:`BundleDoc` (callers may pass ``Bundle.doc``, the JSON object)."""
    return doc if isinstance(doc, BundleDoc) else BundleDoc.from_dict(doc)


def open_export(
    directory: Path, doc: BundleDoc | Mapping[str, Any], threads: int | None = None, device: str = "cpu"
) -> OnnxGraphs:
    """Open ``directory``'s graphs for the bundle ``doc``; a ValueError when they were exported for another one."""
    directory, doc = Path(directory), _typed(doc)
    info = json.loads((directory / "export.json").read_text())
    lor = info["loris"]
    if int(info["image_size"]) != int(doc.image_size) or list(lor["maps"]) != list(doc.maps):
        raise ValueError(f"{directory}: exported for image size {info['image_size']} and maps {lor['maps']}")
    loris = onnx_session(directory / lor["file"], threads, device)
    det = info["detector"]
    use_det = det.get("file") and det["name"] == "yolov5" == doc.detector
    detector = onnx_session(directory / det["file"], threads, device) if use_det else None
    return OnnxGraphs(directory, info, loris, detector)


def _user_export(bundle_dir: Path, doc: BundleDoc, threads: int | None, device: str) -> OnnxGraphs:
    """``BUNDLE/onnx``, checked against the bundle: a stale or damaged export is a ValueError saying how to redo it."""
    directory = bundle_dir / USER_EXPORT
    redo = f"run `python -m pipeline export --model {bundle_dir} --out {directory}` again"
    try:
        recorded = json.loads((directory / "export.json").read_text()).get("bundle_digest")
        stale = recorded is not None and recorded != export_digest(bundle_dir)
        graphs = None if stale else open_export(directory, doc, threads, device)
    except Exception as exc:  # onnxruntime raises its own classes on a truncated file; json and KeyError on the rest
        raise ValueError(f"{directory}: the ONNX export cannot be used ({type(exc).__name__}: {exc}); {redo}") from None
    if graphs is None:
        raise ValueError(f"{directory} was exported from another version of the bundle {bundle_dir}: {redo}")
    return graphs


def cache_entry(bundle_dir: Path, doc: BundleDoc) -> Path:
    """``<cache>/onnx/bundle-<key>``: the key holds the bundle's files, the opset and torch's version."""
    key = {
        "bundle": export_digest(bundle_dir),
        "detector": doc.detector == "yolov5",
        "opset": OPSET,
        "torch": torch.__version__,
        "version": _CACHE_VERSION,
    }
    return cache_home() / "onnx" / f"bundle-{digest(key)}"


def _cached_export(bundle_dir: Path, doc: BundleDoc, threads: int | None, device: str) -> OnnxGraphs:
    """The cache's export of the bundle, made on the first call (:func:`pipeline.shared.cache.fit_or_load`)."""
    entry = cache_entry(bundle_dir, doc)

    def load(path: Path) -> OnnxGraphs:
        return open_export(path, doc, threads, device)

    def make() -> tuple[OnnxGraphs, dict[str, Any]]:
        require("onnx")  # the exporters write through it
        info = {"bundle": str(bundle_dir.resolve())}

        def save(tmp: Path) -> None:
            export_bundle(bundle_dir, tmp, detector=doc.detector == "yolov5")

        publish(entry, save, info)
        return load(entry), info

    graphs, _ = fit_or_load(entry, load, make, every_rank=False)
    return graphs


def onnx_detector(detector: Detector, session: Any, output: str) -> Detector:
    """A copy of a YOLOv5u detector (or of a refined one, with its base copied) whose network is ``session``'s
    graph; its preprocessing, NMS and the refiner are its own code. The detector passed is left as it was."""
    if isinstance(detector, RefinedDetector):
        refined = copy.copy(detector)
        refined.base = onnx_detector(detector.base, session, output)
        return refined
    if not isinstance(detector, YoloV5Detector):
        raise TypeError(f"a YOLOv5u ONNX graph cannot stand in for a {type(detector).__name__}")
    det = copy.copy(detector)
    det._model = OrtModule(session, output)
    det.config = {**detector.config, "device": "cpu"}  # its inputs go to onnxruntime as numpy
    return det


class OnnxBundle(Bundle):
    """A :class:`Bundle` whose :meth:`process` runs the LoRIS graph (and a YOLOv5u detector) in onnxruntime.

    Same attributes as the bundle it was made from (``model_name`` gains ``-onnx``); ``graphs``: the
    sessions and the folder they came from; ``batch_size``: images per run of the LoRIS graph.
    """

    batch_size = 8

    def __init__(self, base: Bundle, graphs: OnnxGraphs) -> None:
        detector = base.detector
        if graphs.detector is not None:
            detector = onnx_detector(detector, graphs.detector, graphs.info["detector"]["outputs"][0])
        super().__init__(base.spec, detector, None, base.device)
        self.graphs = graphs
        self.model_name = f"{self.model_name}-onnx"

    def process(self, images: np.ndarray) -> BundleOutput:
        """Detect, reconstruct, score, calibrate and segment a ``[N, S, S]`` batch in [0, 1] (as ``Bundle.process``)."""
        from reconstruction.segment import segment

        n = len(images)
        pri = self.priors(images)
        x = np.ascontiguousarray(images, dtype=np.float32)[:, None]
        boxes = np.ascontiguousarray(pri.boxes, dtype=np.float32)
        scores, maps = [], []
        for s in range(0, n, self.batch_size):
            sc, mp = self.graphs.loris.run(
                ["scores", "maps"], {"images": x[s : s + self.batch_size], "boxes": boxes[s : s + self.batch_size]}
            )
            scores.append(sc)
            maps.append(mp)
        d = self.spec
        size = self.image_size
        all_maps = np.concatenate(maps) if maps else np.zeros((0, len(d.maps), size, size), np.float32)
        g = d.segmentation
        heat = np.ascontiguousarray(all_maps[:, d.maps.index(g.map)])
        masks = segment(heat, float(g.threshold), kernel=int(g.kernel))
        score = np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)
        # the same calibration as Bundle.process, applied to the graph's scores
        return BundleOutput(score, pri.boxes, pri.sources, pri.confidences, masks, heat, self.probabilities(score))


def export_graphs(
    bundle_dir: Path, doc: BundleDoc | Mapping[str, Any], threads: int | None = None, device: str = "cpu"
) -> OnnxGraphs:
    """The sessions for the bundle in ``bundle_dir`` (its ``bundle.json`` is ``doc``): ``bundle_dir/onnx``
    when it holds an ``export.json`` (a ValueError when stale or damaged), else the cached export, made on
    first use."""
    require("onnxruntime")
    bundle_dir, doc = Path(bundle_dir), _typed(doc)
    if (bundle_dir / USER_EXPORT / "export.json").is_file():
        return _user_export(bundle_dir, doc, threads, device)
    return _cached_export(bundle_dir, doc, threads, device)


def load_onnx_bundle(bundle_dir: Path, device: str = "cpu", threads: int | None = None) -> OnnxBundle:
    """The bundle in ``bundle_dir`` as an :class:`OnnxBundle` (``threads``: onnxruntime's intra-op threads;
    the graphs from :func:`export_graphs`). A RuntimeError names the ``export`` extra when onnxruntime is missing.
    """
    require("onnxruntime")
    base = Bundle.load(Path(bundle_dir), device=device)  # checks the bundle and loads its detector
    return OnnxBundle(base, export_graphs(bundle_dir, base.spec, threads, device))
