"""Torch-native stand-ins for the compiled mmcv ops Co-DINO calls, so it runs on mmcv-lite (no kernels at all).

LoRIS installs ``mmcv-lite`` (docs/design.md, "mmcv-lite and compiled kernels"); its ``mmcv._ext`` is a
stand-in (:mod:`detectors.codetr.mmcv_ext`), so every call below must take a torch-native path:

- ``MultiScaleDeformableAttention`` (encoder and decoder) calls ``MultiScaleDeformableAttnFunction``;
  it goes to mmcv's own ``grid_sample`` formulation, the path mmcv already takes on CPU.
- ``RoIAlign`` (the RoI head's extractor) calls ``roi_align``; it goes to ``torchvision.ops.roi_align``
  (same ``aligned``, ``sampling_ratio`` and ``spatial_scale`` semantics, average pooling).
- ``nms`` and ``batched_nms`` (RPN proposals) call ``NMSop``; it goes to ``torchvision.ops.nms``.
- mmdet's ``FocalLoss`` (ATSS head) calls mmcv's ``sigmoid_focal_loss`` on CUDA; it goes to mmdet's
  ``py_sigmoid_focal_loss``, the path mmdet already takes on CPU.

Each is patched at the module-level name its caller looks up at call time, so every instance and
every importer of ``nms``/``batched_nms`` is covered. On the CPU each op keeps whichever path
:data:`CPU_NATIVE` names when a full mmcv is installed, and always the native one on mmcv-lite. On
CUDA, a full mmcv built with CUDA runs the ops :data:`CUDA_COMPILED` names with its own kernels
(the fused kernels mmcv and Co-DETR's authors use); everything else is native.

>>> with native_ops():  # or use_native_ops(), idempotent, for the rest of the process
...     native_ops_installed()
True
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# CPU path per op: True = torch-native, False = mmcv's compiled CPU kernel (timings: benchmark()).
CPU_NATIVE: dict[str, bool] = {
    "ms_deform_attn": True,  # mmcv has no CPU kernel for it; its own CPU path is this one
    "sigmoid_focal_loss": True,  # mmcv has no CPU kernel for it; mmdet's own CPU path is this one
    "roi_align": True,  # torchvision's is faster than mmcv's at Co-DETR's shapes
    "nms": True,  # torchvision's is as fast as mmcv's at Co-DETR's proposal counts
}

# Ops a full mmcv built with CUDA runs with its own kernel on CUDA tensors: a fused kernel against the
# native path's grid_sample per level (deformable attention) or several elementwise launches (focal
# loss). RoIAlign and NMS stay on torchvision's CUDA kernels, which are kernels too.
CUDA_COMPILED: frozenset[str] = frozenset({"ms_deform_attn", "sigmoid_focal_loss"})

# (module, attribute) of each patched name, keyed by op.
TARGETS: dict[str, tuple[str, str]] = {
    "ms_deform_attn": ("mmcv.ops.multi_scale_deform_attn", "MultiScaleDeformableAttnFunction"),
    "roi_align": ("mmcv.ops.roi_align", "roi_align"),
    "nms": ("mmcv.ops.nms", "NMSop"),
    "sigmoid_focal_loss": ("mmdet.models.losses.focal_loss", "_sigmoid_focal_loss"),
}
_ORIGINALS: dict[str, Any] = {}  # op -> the name's original value while the stand-ins are installed
CpuPath = Literal["measured", "native", "compiled"]
_cpu: CpuPath = "measured"  # which path CPU tensors take: CPU_NATIVE's choice, or one for every op
NATIVE_CALLS: Counter[str] = Counter()  # calls that took the native path, per op (for logs and tests)


def _native(t: Tensor, op: str) -> bool:
    """Whether ``op`` on ``t`` takes the native path; counts it in :data:`NATIVE_CALLS`."""
    from detectors.codetr.mmcv_ext import compiled_cuda_ops, compiled_ops

    if t.is_cuda:
        native = not (op in CUDA_COMPILED and compiled_cuda_ops())
    elif t.device.type != "cpu" or not compiled_ops():
        native = True
    else:
        native = CPU_NATIVE[op] if _cpu == "measured" else _cpu == "native"
    if native:
        NATIVE_CALLS[op] += 1
    return native


class _MSDeformAttnFunction:
    """Stand-in for ``MultiScaleDeformableAttnFunction``, which mmcv calls on CUDA tensors only."""

    @staticmethod
    def apply(
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: int,
    ) -> Tensor:
        if not _native(value, "ms_deform_attn"):
            return _ORIGINALS["ms_deform_attn"].apply(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
            )
        from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch

        # Plain ints: one host copy here instead of one per level inside the loop.
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        return multi_scale_deformable_attn_pytorch(value, shapes, sampling_locations, attention_weights)


def _roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: Any,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    pool_mode: str = "avg",
    aligned: bool = True,
) -> Tensor:
    """mmcv's ``roi_align(input, rois, ...)`` via torchvision (``rois`` are ``[K, 5]``: batch index, x1, y1, x2, y2)."""
    # torchvision pools by averaging only; mmcv's max mode keeps its own kernel.
    if pool_mode != "avg" or not _native(input, "roi_align"):
        return _ORIGINALS["roi_align"](input, rois, output_size, spatial_scale, sampling_ratio, pool_mode, aligned)
    from torch.nn.modules.utils import _pair
    from torchvision.ops import roi_align

    return roi_align(input, rois, _pair(output_size), float(spatial_scale), int(sampling_ratio), bool(aligned))


class _NMSop:
    """Stand-in for mmcv's ``NMSop``, through which ``nms`` and ``batched_nms`` run."""

    @staticmethod
    def apply(
        bboxes: Tensor, scores: Tensor, iou_threshold: float, offset: int, score_threshold: float, max_num: int
    ) -> Tensor:
        if not _native(bboxes, "nms"):
            return _ORIGINALS["nms"].apply(bboxes, scores, iou_threshold, offset, score_threshold, max_num)
        from torchvision.ops import nms

        valid = None
        if score_threshold > 0:
            keep = scores > score_threshold
            bboxes, scores = bboxes[keep], scores[keep]
            valid = keep.nonzero().squeeze(1)
        if offset:
            # mmcv's offset makes a box (x2 - x1 + 1) wide; torchvision's are (x2 - x1).
            bboxes = bboxes + bboxes.new_tensor([0.0, 0.0, offset, offset])
        inds = nms(bboxes, scores, float(iou_threshold))
        if max_num > 0:
            inds = inds[:max_num]
        return valid[inds] if valid is not None else inds


def _sigmoid_focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """mmcv's ``sigmoid_focal_loss``: ``target`` holds class indices, ``C`` (the class count) is background."""
    if not _native(input, "sigmoid_focal_loss"):
        return _ORIGINALS["sigmoid_focal_loss"](input, target, gamma, alpha, weight, reduction)
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

    n, c = input.shape
    onehot = F.one_hot(target, c + 1)[:, :c].type_as(input)
    loss = py_sigmoid_focal_loss(input, onehot, None, gamma, alpha, reduction="none")
    if weight is not None:
        loss = loss * weight[None, :]  # mmcv's weight is per class
    if reduction == "mean":
        return loss.sum() / n  # mmcv divides by the number of rows, not of elements
    if reduction == "sum":
        return loss.sum()
    return loss


_STAND_INS: dict[str, Any] = {
    "ms_deform_attn": _MSDeformAttnFunction,
    "roi_align": _roi_align,
    "nms": _NMSop,
    "sigmoid_focal_loss": _sigmoid_focal_loss,
}


def native_ops_installed() -> bool:
    """Whether :func:`use_native_ops` is in effect."""
    return bool(_ORIGINALS)


def use_native_ops(cpu: CpuPath | None = None) -> None:
    """Route Co-DINO's compiled mmcv ops to torch-native code (see the module docstring); idempotent.

    ``cpu`` picks the path of CPU tensors: ``"measured"`` (per op, :data:`CPU_NATIVE`; the initial
    setting), ``"native"`` or ``"compiled"`` for every op; ``None`` keeps the current setting. Tensors
    on other devices always take the native path.
    """
    global _cpu
    if cpu is not None:
        if cpu not in ("measured", "native", "compiled"):
            raise ValueError(f"cpu must be 'measured', 'native' or 'compiled', not {cpu!r}")
        _cpu = cpu
    if _ORIGINALS:
        return
    for op, (module, name) in TARGETS.items():
        mod = importlib.import_module(module)
        _ORIGINALS[op] = getattr(mod, name)
        setattr(mod, name, _STAND_INS[op])


def restore_compiled_ops() -> None:
    """Undo :func:`use_native_ops` (a no-op when it is not in effect)."""
    global _cpu
    for op, original in list(_ORIGINALS.items()):
        module, name = TARGETS[op]
        setattr(importlib.import_module(module), name, original)
        del _ORIGINALS[op]
    _cpu = "measured"


@contextmanager
def native_ops(cpu: CpuPath | None = None) -> Iterator[None]:
    """:func:`use_native_ops` inside the block; the previous state (installed or not) comes back after.

    >>> with native_ops(cpu="native"):
    ...     pass
    """
    was_installed, was_cpu = native_ops_installed(), _cpu
    use_native_ops(cpu)
    try:
        yield
    finally:
        if was_installed:
            use_native_ops(was_cpu)
        else:
            restore_compiled_ops()


def benchmark(repeats: int = 20, threads: int = 1) -> dict[str, float]:
    """Median seconds of each op on both CPU paths at the default profile's shapes (forward + backward).

    Shapes of ``configs/detectors/codetr.py`` (128-px input, batch 8, width 64, 8 heads): deformable
    attention over 3 levels (16x16, 8x8, 4x4) with 336 encoder queries; RoIAlign of 8 x 128 sampled
    proposals on the stride-8 map; NMS over an image's ~750 RPN proposals at IoU 0.7. mmcv has no CPU
    kernel for deformable attention, so only its native path is timed.
    """
    from mmcv.ops import RoIAlign, batched_nms

    from runtime.device import torch_threads
    from runtime.timing import median_seconds

    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    with torch_threads(threads):
        # Deformable attention: value [bs, keys, heads, dims/head], locations [bs, q, heads, levels, points, 2].
        shapes = torch.tensor([[16, 16], [8, 8], [4, 4]])
        keys = int(shapes.prod(1).sum())
        value = torch.rand(8, keys, 8, 8, generator=gen).requires_grad_()
        loc = torch.rand(8, keys, 8, 3, 4, 2, generator=gen).requires_grad_()
        attn = torch.rand(8, keys, 8, 3, 4, generator=gen).softmax(-1).requires_grad_()
        start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])

        def msda() -> None:
            _MSDeformAttnFunction.apply(value, shapes, start, loc, attn, 64).sum().backward()

        # RoIAlign: boxes of 4-100 px inside the 128-px image, on the stride-8 map.
        feats = torch.rand(8, 64, 16, 16, generator=gen).requires_grad_()
        xy = torch.rand(1024, 2, generator=gen) * 100
        wh = 4 + torch.rand(1024, 2, generator=gen) * 96
        rois = torch.cat([torch.randint(0, 8, (1024, 1), generator=gen).float(), xy, (xy + wh).clamp(max=128)], 1)
        layer = RoIAlign(7, spatial_scale=1 / 8, sampling_ratio=0)  # the RoI head's layer
        # NMS: one image's proposals from 4 levels (768 + 192 + 48 + 12 anchors, 500 kept per level at most).
        n = 500 + 192 + 48 + 12
        bxy = torch.rand(n, 2, generator=gen) * 110
        boxes = torch.cat([bxy, bxy + 4 + torch.rand(n, 2, generator=gen) * 60], 1)
        scores = torch.rand(n, generator=gen)
        levels = torch.cat([torch.full((k,), i) for i, k in enumerate([500, 192, 48, 12])])
        nms_cfg = dict(type="nms", iou_threshold=0.7)

        def roi() -> None:
            layer(feats, rois).sum().backward()

        def nms() -> None:
            batched_nms(boxes, scores, levels, nms_cfg)

        def timed(fn: Callable[[], None]) -> float:
            return median_seconds(fn, repeats=repeats, warmup=2)

        from detectors.codetr.mmcv_ext import compiled_ops

        paths: tuple[CpuPath, ...] = ("compiled", "native") if compiled_ops() else ("native",)
        for path in paths:
            with native_ops(cpu=path):
                if path == "native":
                    out["ms_deform_attn/native"] = timed(msda)
                out[f"roi_align/{path}"] = timed(roi)
                out[f"nms/{path}"] = timed(nms)
    return out


if __name__ == "__main__":
    from runtime.env import setup_environment

    setup_environment()
    for key, seconds in benchmark().items():
        print(f"{key:24s} {seconds * 1e3:8.3f} ms")
