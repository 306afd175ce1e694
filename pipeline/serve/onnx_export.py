"""ONNX export of a trained bundle (``python -m pipeline export --model BUNDLE --format onnx``).

Writes into ``<out>/``:

- ``unet.onnx``: the inpainting U-Net alone, ``image [B, 1, S, S]`` in [-1, 1] -> ``recon`` (same range);
- ``loris.onnx``: LoRIS in one graph (:class:`LorisGraph`): ``images [B, 1, S, S]`` in [0, 1] and
  ``boxes [B, 4]`` (model pixels, NaN row: no box) -> ``scores [B]`` (the bundle's image score) and
  ``maps [B, M, S, S]`` (the bundle's anomaly maps, in ``bundle.json``'s ``maps`` order);
- ``detector.onnx``: the bundle's detector. YOLOv5u through ultralytics' own exporter (dynamic
  batch; raw candidates ``[B, 5, A]`` before NMS, as ultralytics exports them); Co-DETR through
  torch.onnx's tracer with the torch-native ops of :mod:`detectors.codetr.native_ops` (batch 1 and
  the model's image size are fixed by the trace; ``boxes [1, K, 4]`` and ``scores [1, K]`` after
  its own top-k, in model pixels);
- ``export.json``: what was exported, the input/output names and shapes, what was not, and the
  bundle's :func:`export_digest` (``predict --engine onnxruntime`` refuses a stale export).

A box refiner (``refined.json``) is not exported: ``export.json`` says so, and the boxes are the
base detector's. Running the graphs needs only onnxruntime, not mmcv (docs/design.md, "Outputs for clinicians
and PACS").

>>> import torch
>>> from reconstruction.unet import UNet, UNetConfig
>>> g = LorisGraph(UNet(UNetConfig.profile("tiny")).eval(), maps=("dd",), score_map="dd")
>>> s, m = g(torch.rand(2, 1, 32, 32), torch.tensor([[4.0, 4.0, 20.0, 12.0], [float("nan")] * 4]))
>>> tuple(s.shape), tuple(m.shape)
((2,), (2, 1, 32, 32))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.serve.bundle_file import read_bundle_doc
from reconstruction.deviation import anomaly_map
from reconstruction.masking import apply_single_mask, box_masks
from reconstruction.unet import UNet, fold_batchnorm
from runtime.io import atomic_write, atomic_write_text
from scans.fingerprint import file_digest

OPSET = 18  # supported by onnxruntime >= 1.18 (the export extra's floor)


class LorisGraph(nn.Module):
    """Box masking, inpainting, anomaly maps and the image score as one module (for export).

    Follows :func:`reconstruction.infer.reconstruct` (raw network output, no composite) and
    :func:`reconstruction.deviation.image_score` (``pooling`` mean/max/topk over the image or the box).
    """

    def __init__(
        self,
        unet: UNet,
        maps: Sequence[str],
        score_map: str,
        pooling: str = "mean",
        region: str = "image",
        topk_fraction: float = 0.01,
        margin: float = 0.0,
        inset: float = 0.0,
    ) -> None:
        super().__init__()
        if score_map not in maps:
            raise ValueError(f"score map {score_map!r} is not among the maps {list(maps)}")
        if pooling not in ("mean", "max", "topk") or region not in ("image", "box"):
            raise ValueError(f"unknown pooling {pooling!r} or region {region!r}")
        self.unet = fold_batchnorm(unet).eval()
        self.maps, self.score_index = tuple(maps), list(maps).index(score_map)
        self.pooling, self.region = pooling, region
        self.topk_fraction, self.margin, self.inset = float(topk_fraction), float(margin), float(inset)

    def forward(self, images: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        x = images * 2 - 1
        masked, _ = apply_single_mask(x, boxes, self.margin)
        recon = self.unet(masked)
        maps = torch.cat([anomaly_map(n, x, recon) for n in self.maps], dim=1)
        return self._score(maps[:, self.score_index], boxes), maps

    def _score(self, m: Tensor, boxes: Tensor) -> Tensor:
        b, h, w = m.shape
        flat = m.reshape(b, h * w)
        if self.region == "box":
            pool_margin = self.margin - self.inset * min(h, w)
            sel = box_masks(boxes, h, w, pool_margin, device=m.device)[:, 0].reshape(b, h * w)
            sel = sel | ~sel.any(dim=1, keepdim=True)  # no box: the whole image
        else:
            sel = torch.ones_like(flat, dtype=torch.bool)
        count = sel.sum(dim=1).to(m.dtype)
        if self.pooling == "mean":
            return (flat * sel).sum(dim=1) / count
        low = torch.full_like(flat, -torch.inf)
        if self.pooling == "max":
            return torch.where(sel, flat, low).amax(dim=1)
        vals = torch.where(sel, flat, low).sort(dim=1, descending=True).values
        vals = torch.where(torch.isinf(vals), torch.zeros_like(vals), vals)
        k = torch.clamp(torch.ceil(count * self.topk_fraction), min=1).long()
        return vals.cumsum(dim=1).gather(1, (k - 1).view(-1, 1)).squeeze(1) / k.to(m.dtype)


def _traced_export(
    module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str]
) -> None:
    """torch.onnx's TorchScript exporter with a dynamic batch axis, written atomically.

    Tensor ops only, so the trace holds for every batch; it exports far faster than torch.export.
    """
    axes = {name: {0: "batch"} for name in [*inputs, *outputs]}

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes read once; the batch axis stays dynamic
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)  # traced sizes
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)  # left to onnxruntime
            torch.onnx.export(
                module.eval(),
                args,
                str(tmp),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )

    atomic_write(path, write)


def export_unet(unet: UNet, path: Path, image_size: int) -> Path:
    """``unet.onnx``: ``image [B, 1, S, S]`` in [-1, 1] -> ``recon`` (BatchNorm folded)."""
    _traced_export(fold_batchnorm(unet), (torch.zeros(1, 1, image_size, image_size),), Path(path), ["image"], ["recon"])
    return Path(path)


def export_graph(graph: LorisGraph, path: Path, image_size: int) -> Path:
    """``loris.onnx``: ``images [B, 1, S, S]`` in [0, 1], ``boxes [B, 4]`` -> ``scores [B]``, ``maps``."""
    s = image_size
    example = (torch.rand(2, 1, s, s), torch.tensor([[s / 4, s / 4, s / 2, s / 2], [float("nan")] * 4]))
    _traced_export(graph, example, Path(path), ["images", "boxes"], ["scores", "maps"])
    return Path(path)


def export_yolov5(detector: Any, path: Path) -> Path:
    """``detector.onnx`` of a YOLOv5u :class:`detectors.yolov5.YoloV5Detector` via ultralytics' exporter.

    Input ``images [B, 3, imgsz, imgsz]`` in [0, 1] (the gray scan in all three channels), output
    ``output0 [B, 5, A]``: ``(cx, cy, w, h, score)`` per anchor before NMS, in ``imgsz`` pixels.
    """
    import copy

    from detectors.yolov5 import import_ultralytics

    import_ultralytics()
    from ultralytics.engine.exporter import Exporter

    model = copy.deepcopy(detector._model).cpu().eval()
    imgsz = int(detector.config["imgsz"])
    with tempfile.TemporaryDirectory(prefix="loris-onnx-") as tmp:
        model.pt_path = str(Path(tmp) / "detector.pt")  # the exporter writes beside this name
        model.task = "detect"  # set by ultralytics' YOLO wrapper, which the detector does not keep
        args = dict(format="onnx", imgsz=imgsz, dynamic=True, simplify=False, opset=OPSET, device="cpu")
        threads = torch.get_num_threads()
        try:
            produced = Path(Exporter(overrides=args)(model=model))
        finally:
            torch.set_num_threads(threads)  # ultralytics' select_device changes the thread count
        atomic_write(path, lambda t: shutil.copyfile(produced, t))
    return Path(path)


class _CoDetrGraph(nn.Module):
    """Co-DETR's inference as a traceable module: ``[1, 1, s, s]`` in [0, 1] -> boxes and scores."""

    def __init__(self, detector: Any) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        from detectors.codetr.detector import _PIXEL_MEAN, _PIXEL_STD

        d = self.detector
        x = (images - _PIXEL_MEAN) / _PIXEL_STD
        results = d.model.predict(x, d._samples(None, x.shape[0]), rescale=False)
        boxes = torch.stack([r.pred_instances.bboxes for r in results])
        scores = torch.stack([r.pred_instances.scores for r in results])
        return boxes, scores


def export_codetr(detector: Any, path: Path) -> Path:
    """``detector.onnx`` of a :class:`detectors.codetr.CoDetrDetector`, traced at batch 1 with native ops.

    Input ``images [1, 1, s, s]`` in [0, 1] at the detector's ``image_size``; outputs ``boxes [1, K, 4]``
    (x1, y1, x2, y2 in those pixels) and ``scores [1, K]``, best first, as its ``predict`` gives them.
    """
    import copy

    from detectors.codetr.native_ops import native_ops

    det = copy.copy(detector)
    det.model = copy.deepcopy(detector.model).cpu().eval().requires_grad_(False)
    s = int(det.image_size)

    def write(tmp: Path) -> None:
        # grad mode on: the no-grad CPU fast paths (fused backbone, reordered attention) are not traced
        with native_ops(cpu="native"), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # loops over the fixed batch and levels
            torch.onnx.export(
                _CoDetrGraph(det),
                (torch.rand(1, 1, s, s),),
                str(tmp),
                input_names=["images"],
                output_names=["boxes", "scores"],
                opset_version=OPSET,
                dynamo=False,  # torch.export cannot trace mmdet's data samples; the TorchScript tracer can
            )

    atomic_write(path, write)
    return Path(path)


def _load_detector(det_dir: Path, name: str) -> Any:
    from detectors.base import detector_class

    return detector_class(name).load(det_dir)


def _export_detector(det_dir: Path, out: Path, name: str, requested: bool) -> dict[str, Any]:
    """Export the bundle's detector to ``out/detector.onnx`` where it has an exporter; its ``export.json`` entry."""
    info: dict[str, Any] = {"name": name, "file": None, "note": ""}
    if not requested:
        info["note"] = "not requested"
    elif name == "yolov5":
        det = _load_detector(det_dir, name)
        export_yolov5(det, out / "detector.onnx")
        info.update(file="detector.onnx", inputs={"images": [None, 3, det.config["imgsz"], det.config["imgsz"]]})
        info["outputs"] = ["output0"]
    elif name == "codetr":
        det = _load_detector(det_dir, name)
        export_codetr(det, out / "detector.onnx")
        info.update(file="detector.onnx", inputs={"images": [1, 1, det.image_size, det.image_size]})
        info["outputs"] = ["boxes", "scores"]
    else:
        info["note"] = f"detector {name!r} has no ONNX exporter"
    if info["file"] and (det_dir / "refined.json").is_file():
        info["note"] = "the box refiner is not exported: boxes are the base detector's"
    return info


def export_digest(bundle_dir: Path) -> str:
    """20-hex digest of a bundle's files (``bundle.json``, ``detector/``, ``unet/``): their names and bytes.

    Frozen apart from :func:`pipeline.serve.bundle_file.bundle_digest`: ``export.json`` records it and the
    ONNX cache is keyed by it, so another formula would make every existing export stale.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp()); _ = (root / "bundle.json").write_text("{}")
    >>> d = export_digest(root); _ = (root / "bundle.json").write_text("{ }")
    >>> len(d), d == export_digest(root)
    (20, False)
    """
    root = Path(bundle_dir)
    files = [root / "bundle.json"] + sorted(
        p for d in ("detector", "unet") for p in (root / d).rglob("*") if p.is_file()
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()[:20]


def export_bundle(bundle_dir: Path, out: Path, detector: bool = True) -> dict[str, Any]:
    """Export a bundle's U-Net, its LoRIS graph and detector into ``out``; returns ``export.json``
    (``bundle_digest``: :func:`export_digest` of the bundle exported, so a stale export is recognised).
    Its ``bundle.json`` is checked as :meth:`pipeline.serve.bundle.Bundle.load` checks it, so a tampered
    bundle is refused before anything is exported."""
    from reconstruction.checkpoint import load_model

    bundle_dir, out = Path(bundle_dir), Path(out)
    hint = f"the bundle {bundle_dir} is damaged: restore it or train a new one with `train`"
    doc = read_bundle_doc(bundle_dir, hint)
    size = int(doc.image_size)
    unet, _ = load_model(bundle_dir / "unet", map_location="cpu", hint=hint)
    s = doc.score
    graph = LorisGraph(
        unet,
        maps=doc.maps,
        score_map=s.map,
        pooling=s.pooling,
        region=s.region,
        topk_fraction=float(s.topk_fraction),
        margin=float(doc.mask_margin),
        inset=float(s.inset),
    )
    out.mkdir(parents=True, exist_ok=True)
    export_unet(unet, out / "unet.onnx", size)
    export_graph(graph, out / "loris.onnx", size)
    info: dict[str, Any] = {
        "format": 1,
        "opset": OPSET,
        "image_size": size,
        "bundle_digest": export_digest(bundle_dir),
        "unet": {"file": "unet.onnx", "inputs": {"image": [None, 1, size, size]}, "outputs": ["recon"]},
        "loris": {
            "file": "loris.onnx",
            "inputs": {"images": [None, 1, size, size], "boxes": [None, 4]},
            "outputs": ["scores", "maps"],
            "maps": list(doc.maps),
            "score_map": s.map,
        },
        "detector": _export_detector(bundle_dir / "detector", out, doc.detector, detector),
    }
    atomic_write_text(out / "export.json", json.dumps(info, indent=1))
    return info


def onnx_session(path: Path, threads: int | None = None, device: str = "cpu") -> Any:
    """An onnxruntime session for an exported file (``threads``: intra-op threads, None = onnxruntime's default).

    ``device``: ``cpu``; ``cuda``/``cuda:N`` needs onnxruntime's CUDA provider (``onnxruntime-gpu``);
    ``auto`` takes it when there is one, else the CPU. Idle threads sleep instead of spinning under
    ``OMP_WAIT_POLICY=PASSIVE``, as torch's do.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":  # as torch's threads (set by the CLI)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if device != "cpu":
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if device != "auto" and not has_cuda:
            raise RuntimeError(
                f"device {device!r}: this onnxruntime has no CUDA provider; install onnxruntime-gpu or use the CPU"
            )
        if has_cuda:
            index = device.partition(":")[2].split(",")[0] or "0"
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(index)}))
    return ort.InferenceSession(os.fspath(path), opts, providers=providers)
