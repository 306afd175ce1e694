"""Torch-native stand-ins for mmcv's compiled ops (detectors/codetr/native_ops.py), checked on CPU.

LoRIS installs mmcv-lite: ``mmcv._ext`` is LoRIS's stand-in (detectors/codetr/mmcv_ext.py), whose every
kernel raises :class:`CompiledOpMissing`, so nothing here compares against mmcv's compiled kernels.
Each native op is checked against an independent reference that needs no compiled code: deformable
attention against mmcv's CUDA kernel formula, RoIAlign against a pure-numpy RoIAlign with mmcv's
semantics, NMS and batched NMS against a greedy numpy NMS, focal loss against mmcv's kernel formula.

Tolerances: float64 comparisons (deformable attention, focal loss) within 1e-10; float32 RoIAlign
against the float64 numpy reference within 1e-5 absolute; NMS indices exactly equal.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from detectors import build_detector
from detectors.codetr import CoDetrDetector, load_config, mmcv_ext  # installs the mmcv._ext stand-in first
from detectors.codetr.mmcv_ext import CompiledOpMissing

# Hard imports, no importorskip: on mmcv-lite mmcv.ops imports through the stand-in, and these tests
# must run; a missing mmcv-lite, mmdet or torchvision is a failure, not a skip.
mmcv_ext.install()
import mmdet  # noqa: E402, F401
import torchvision  # noqa: E402, F401
from mmcv.ops import RoIAlign, batched_nms, nms, soft_nms  # noqa: E402

from detectors.codetr.native_ops import (  # noqa: E402
    CPU_NATIVE,
    NATIVE_CALLS,
    TARGETS,
    CpuPath,
    native_ops,
    native_ops_installed,
    restore_compiled_ops,
    use_native_ops,
)

MSDA = importlib.import_module("mmcv.ops.multi_scale_deform_attn")
FOCAL = importlib.import_module("mmdet.models.losses.focal_loss")
# Every CPU setting of use_native_ops: on mmcv-lite all three take the native route (there is no kernel to
# take); on a full mmcv, "compiled" runs mmcv's CPU kernels, checked against the same references.
PATHS: tuple[CpuPath, ...] = ("measured", "native", "compiled")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detectors" / "codetr.py"


def _bilinear_reference(
    value: torch.Tensor, shapes: list[tuple[int, int]], loc: torch.Tensor, attn: torch.Tensor
) -> torch.Tensor:
    """mmcv's CUDA kernel (``ms_deform_attn_im2col_bilinear``) spelt out: pixel ``loc * size - 0.5``,
    four corners weighted bilinearly, corners outside the map contribute zero."""
    bs, _, heads, dims = value.shape
    _, queries, _, levels, points, _ = loc.shape
    b = torch.arange(bs)[:, None, None, None]
    h = torch.arange(heads)[None, None, :, None]
    out = value.new_zeros(bs, queries, heads, points, dims)
    start = 0
    for lvl, (hh, ww) in enumerate(shapes):
        v = value[:, start : start + hh * ww].reshape(bs, hh, ww, heads, dims)
        start += hh * ww
        x = loc[:, :, :, lvl, :, 0] * ww - 0.5
        y = loc[:, :, :, lvl, :, 1] * hh - 0.5
        x0, y0 = x.floor(), y.floor()
        lx, ly = x - x0, y - y0
        for dy, dx, w in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
            yi, xi = (y0 + dy).long(), (x0 + dx).long()
            inside = (yi >= 0) & (yi < hh) & (xi >= 0) & (xi < ww)
            corner = v[b, yi.clamp(0, hh - 1), xi.clamp(0, ww - 1), h]
            out = out + (w * inside * attn[:, :, :, lvl])[..., None] * corner
    return out.sum(3).reshape(bs, queries, heads * dims)


def test_deformable_attention_matches_the_kernel_formula_with_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (3, 4), (2, 2)]
    keys = sum(h * w for h, w in shapes)
    bs, queries, heads, dims, points = 2, 7, 2, 4, 3

    def inputs() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        value = torch.randn(bs, keys, heads, dims, generator=g, dtype=torch.float64)
        # Some locations fall outside [0, 1]: the zero padding is part of the formula.
        loc = torch.rand(bs, queries, heads, len(shapes), points, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
        attn = torch.rand(bs, queries, heads, len(shapes), points, generator=g, dtype=torch.float64)
        return [t.requires_grad_() for t in (value, loc, attn)]

    shapes_t = torch.tensor(shapes)
    start = torch.tensor([0, 30, 42])
    upstream = torch.randn(bs, queries, heads * dims, generator=gen, dtype=torch.float64)
    a, b = inputs(), inputs()
    with native_ops():
        # The name mmcv's MultiScaleDeformableAttention calls on CUDA tensors.
        got = MSDA.MultiScaleDeformableAttnFunction.apply(a[0], shapes_t, start, a[1], a[2], 64)
    want = _bilinear_reference(b[0], shapes, b[1], b[2])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga.grad, gb.grad, rtol=0, atol=1e-10)


def _expect_native(op: str, path: CpuPath) -> bool:
    """Whether ``op`` on a CPU tensor takes the native route under ``path`` (always, on mmcv-lite)."""
    if not mmcv_ext.compiled_ops():
        return True
    return CPU_NATIVE[op] if path == "measured" else path == "native"


def _axis_weights(start: float, length: float, pooled: int, sampling_ratio: int, size: int) -> np.ndarray:
    """``[pooled, size]``: along one axis, each bin's average of its samples' 1-D bilinear weights.

    mmcv's roi_align kernel: bin ``p`` of a RoI starting at ``start`` takes ``grid`` samples at
    ``start + (p + (i + 0.5) / grid) * length / pooled``, ``grid = sampling_ratio`` or, when that is
    not positive, ``ceil(length / pooled)``; a sample outside ``[-1, size]`` counts as zero, one in
    ``[-1, 0]`` reads pixel 0 and one past ``size - 1`` reads the last pixel. The 2-D kernel (zero
    when either coordinate is outside, weights ``wy * wx``, divided by ``grid_y * grid_x``) is the
    outer product of two of these.
    """
    bin_len = length / pooled
    grid = sampling_ratio if sampling_ratio > 0 else math.ceil(length / pooled)
    weights = np.zeros((pooled, size))
    for p in range(pooled):
        for i in range(grid):
            v = start + p * bin_len + (i + 0.5) * bin_len / grid
            if v < -1.0 or v > size:
                continue
            v = max(v, 0.0)
            lo = int(v)
            if lo >= size - 1:
                weights[p, size - 1] += 1.0 / grid
            else:
                weights[p, lo] += (1.0 - (v - lo)) / grid
                weights[p, lo + 1] += (v - lo) / grid
    return weights


def _roi_align_reference(
    feats: np.ndarray,
    rois: np.ndarray,
    upstream: np.ndarray,
    pooled: tuple[int, int],
    scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """mmcv's average RoIAlign in float64 numpy: the output ``[K, C, ph, pw]`` and the gradient of
    ``(output * upstream).sum()`` with respect to ``feats`` (RoIAlign is linear in ``feats``).

    ``rois`` are ``[K, 5]`` (batch index, x1, y1, x2, y2) in image pixels; ``aligned`` shifts them
    by half a pixel after scaling; not aligned, a RoI is at least one pixel wide and high.
    """
    _, c, h, w = feats.shape
    out = np.zeros((len(rois), c, *pooled))
    grad = np.zeros_like(feats)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.astype(np.float64)):
        x0, y0 = x1 * scale - offset, y1 * scale - offset
        width, height = x2 * scale - offset - x0, y2 * scale - offset - y0
        if not aligned:
            width, height = max(width, 1.0), max(height, 1.0)
        ay = _axis_weights(y0, height, pooled[0], sampling_ratio, h)
        ax = _axis_weights(x0, width, pooled[1], sampling_ratio, w)
        out[k] = np.einsum("ph,chw,qw->cpq", ay, feats[int(b)], ax)
        grad[int(b)] += np.einsum("ph,cpq,qw->chw", ay, upstream[k], ax)
    return out, grad


def test_roi_align_reference_reads_a_ramp_at_the_bin_centres() -> None:
    """Sanity of the reference's semantics, independent of any implementation: bilinear sampling of
    ``f(x) = x`` is exact and the samples of a bin are symmetric about its centre, so each bin of a
    RoI inside the map reads its centre's x (aligned: half a pixel left of the scaled box)."""
    w = 20
    feats = np.broadcast_to(np.arange(w, dtype=np.float64), (1, 1, 6, w)).copy()
    rois = np.array([[0, 4.0, 2.0, 32.0, 8.0]])  # at scale 1/2: x in [2, 16], inside the 20-px map
    for aligned, start in ((True, 1.5), (False, 2.0)):
        out, _ = _roi_align_reference(feats, rois, np.zeros((1, 1, 2, 7)), (2, 7), 0.5, 0, aligned)
        centres = start + (np.arange(7) + 0.5) * 14 / 7
        np.testing.assert_allclose(out[0, 0], np.broadcast_to(centres, (2, 7)), rtol=0, atol=1e-12)
        layer = RoIAlign((2, 7), spatial_scale=0.5, sampling_ratio=0, aligned=aligned)
        with native_ops():
            got = layer(torch.as_tensor(feats, dtype=torch.float32), torch.as_tensor(rois, dtype=torch.float32))
        np.testing.assert_allclose(got.numpy()[0, 0], out[0, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "aligned,sampling_ratio,scale,pooled",
    [(True, 0, 1 / 8, 7), (True, 2, 0.5, 7), (False, 0, 0.25, 7), (False, -1, 1.0, 7), (True, 1, 1.0, (3, 5))],
)
def test_roi_align_matches_numpy_reference(
    path: CpuPath, aligned: bool, sampling_ratio: int, scale: float, pooled: Any
) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 40
    # In map pixels, then in image pixels: some boxes start left of / above the 11 x 13 map, some end past it.
    xy = (torch.rand(n, 2, generator=gen) * 16 - 2) / scale
    wh = torch.rand(n, 2, generator=gen) * 10 / scale
    wh[:5] = 0.3  # tiny boxes: the not-aligned path clamps them to one pixel
    rois = torch.cat([torch.randint(0, 2, (n, 1), generator=gen).float(), xy, xy + wh], 1)
    rois[-1, 1:] = torch.tensor([1.0, 130.0, 40.0, 150.0]) / scale  # below the map at any scale: reads zeros
    feats = torch.randn(2, 5, 13, 11, generator=gen)
    size = (pooled, pooled) if isinstance(pooled, int) else pooled
    upstream = torch.randn(n, 5, *size, generator=gen)
    x = feats.clone().requires_grad_()
    NATIVE_CALLS.clear()
    with native_ops(cpu=path):
        y = RoIAlign(pooled, spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)(x, rois)
    assert NATIVE_CALLS["roi_align"] == int(_expect_native("roi_align", path))
    (y * upstream).sum().backward()
    want, want_grad = _roi_align_reference(
        feats.double().numpy(), rois.double().numpy(), upstream.double().numpy(), size, scale, sampling_ratio, aligned
    )
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), want_grad, rtol=0, atol=1e-5)
    assert (np.abs(want[:-1]).sum(axis=(1, 2, 3)) > 0).mean() > 0.6 and not want[-1].any()  # the last: padding


def _iou(boxes: np.ndarray, offset: int) -> np.ndarray:
    """Pairwise IoU in float64 with mmcv's ``offset``: a box is ``x2 - x1 + offset`` wide."""
    b = boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    w = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]) + offset, 0, None)
    h = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]) + offset, 0, None)
    inter = w * h
    return inter / (area[:, None] + area[None, :] - inter)


def _greedy_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    offset: int = 0,
    score_threshold: float = 0.0,
    max_num: int = -1,
) -> np.ndarray:
    """mmcv's ``nms`` spelt out: drop scores not above ``score_threshold`` (when it is positive), visit
    boxes from the best score down, keep one unless its IoU with a kept box exceeds ``iou_threshold``,
    return the first ``max_num`` kept (all when not positive), best first, as indices into ``boxes``."""
    iou = _iou(boxes, offset)
    candidates = np.flatnonzero(scores > score_threshold) if score_threshold > 0 else np.arange(len(scores))
    keep: list[int] = []
    for i in candidates[np.argsort(-scores[candidates], kind="stable")]:
        if all(iou[i, k] <= iou_threshold for k in keep):
            keep.append(int(i))
    return np.array(keep[:max_num] if max_num > 0 else keep, dtype=np.int64)


def _batched_reference(
    boxes: np.ndarray,
    scores: np.ndarray,
    idxs: np.ndarray,
    iou_threshold: float,
    agnostic: bool,
    max_num: int,
    split: bool = False,
) -> np.ndarray:
    """mmcv's ``batched_nms``: greedy NMS within each class (or over all, class-agnostic), the survivors
    best first, the first ``max_num`` of them. With more boxes than ``split_thr`` (``split``), mmcv runs
    one NMS per class even when class-agnostic."""
    if agnostic and not split:
        groups = [np.arange(len(scores))]
    else:
        groups = [np.flatnonzero(idxs == c) for c in np.unique(idxs)]
    kept = np.concatenate([g[_greedy_nms(boxes[g], scores[g], iou_threshold)] for g in groups])
    kept = kept[np.argsort(-scores[kept], kind="stable")]
    return kept[:max_num] if max_num > 0 else kept


def _boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=gen) * 40], 1)
    return boxes, torch.rand(n, generator=gen), torch.randint(0, 4, (n,), generator=gen)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "iou,offset,score_thr,max_num", [(0.7, 0, 0.0, -1), (0.3, 1, 0.0, -1), (0.5, 0, 0.4, 20), (0.5, 1, 0.2, 7)]
)
def test_nms_matches_greedy_reference(path: CpuPath, iou: float, offset: int, score_thr: float, max_num: int) -> None:
    boxes, scores, _ = _boxes(300, seed=int(iou * 10) + offset)
    NATIVE_CALLS.clear()
    with native_ops(cpu=path):
        dets, inds = nms(boxes, scores, iou, offset=offset, score_threshold=score_thr, max_num=max_num)
    assert NATIVE_CALLS["nms"] == int(_expect_native("nms", path))
    want = _greedy_nms(boxes.numpy(), scores.numpy(), iou, offset, score_thr, max_num)
    np.testing.assert_array_equal(inds.numpy(), want)
    assert torch.equal(dets, torch.cat([boxes[want], scores[want, None]], 1))
    assert 0 < len(want) < 300


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cfg", [{}, {"split_thr": 50}, {"class_agnostic": True}, {"max_num": 10}])
def test_batched_nms_matches_greedy_reference(path: CpuPath, cfg: dict) -> None:
    boxes, scores, idxs = _boxes(400, seed=3)
    with native_ops(cpu=path):
        dets, keep = batched_nms(boxes, scores, idxs, dict(type="nms", iou_threshold=0.6, **cfg))
    agnostic, max_num = cfg.get("class_agnostic", False), cfg.get("max_num", -1)
    want = _batched_reference(boxes.numpy(), scores.numpy(), idxs.numpy(), 0.6, agnostic, max_num, "split_thr" in cfg)
    np.testing.assert_array_equal(keep.numpy(), want)
    assert torch.equal(dets, torch.cat([boxes[want], scores[want, None]], 1))
    # The classes were kept apart: some kept boxes of different classes overlap beyond the threshold.
    if not cfg.get("class_agnostic") and "max_num" not in cfg:
        overlap = _iou(boxes[want].numpy(), 0) > 0.6
        np.fill_diagonal(overlap, False)
        assert overlap.any()


@st.composite
def _box_sets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to 24 float32 boxes (some identical, some nested, some apart), distinct scores and 3 classes."""
    n = draw(st.integers(1, 24))
    coord = st.floats(0, 16, width=32)  # a small field: many boxes overlap, with IoUs all over [0, 1]
    side = st.floats(0.5, 16, width=32)
    boxes = np.array(
        [
            [x, y, x + w, y + h]
            for x, y, w, h in draw(st.lists(st.tuples(coord, coord, side, side), min_size=n, max_size=n))
        ],
        np.float32,
    )
    order = np.array(draw(st.permutations(range(n))))
    scores = ((order + 1) / (n + 1)).astype(np.float32)  # distinct: no tie for the sort to break
    idxs = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), np.int64)
    return boxes, scores, idxs


def _clear_of(values: np.ndarray, threshold: float) -> bool:
    """No value within 1e-4 of ``threshold``: the float32 kernel and the float64 reference may round such
    an IoU (or score) to either side of it."""
    return bool(np.all(np.abs(values - threshold) > 1e-4))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    data=_box_sets(),
    iou=st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]),
    offset=st.sampled_from([0, 1]),
    score_thr=st.sampled_from([0.0, 0.3, 0.6]),
    max_num=st.sampled_from([-1, 0, 1, 3]),
)
def test_nms_matches_greedy_reference_on_any_boxes(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], iou: float, offset: int, score_thr: float, max_num: int
) -> None:
    boxes, scores, _ = data
    assume(_clear_of(_iou(boxes, offset), iou) and _clear_of(scores, score_thr))
    with native_ops():
        dets, inds = nms(boxes, scores, iou, offset=offset, score_threshold=score_thr, max_num=max_num)
    assert isinstance(inds, np.ndarray)  # numpy in, numpy out
    np.testing.assert_array_equal(inds, _greedy_nms(boxes, scores, iou, offset, score_thr, max_num))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    data=_box_sets(),
    iou=st.sampled_from([0.3, 0.5, 0.7]),
    agnostic=st.booleans(),
    split=st.booleans(),
    max_num=st.sampled_from([-1, 2]),
)
def test_batched_nms_matches_greedy_reference_on_any_boxes(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], iou: float, agnostic: bool, split: bool, max_num: int
) -> None:
    boxes, scores, idxs = data
    assume(_clear_of(_iou(boxes, 0), iou))
    cfg = dict(type="nms", iou_threshold=iou, class_agnostic=agnostic, max_num=max_num)
    if split:
        cfg["split_thr"] = 1  # mmcv's per-class loop instead of one NMS over class-shifted boxes
    with native_ops():
        _, keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs), cfg)
    np.testing.assert_array_equal(keep.numpy(), _batched_reference(boxes, scores, idxs, iou, agnostic, max_num, split))


def test_mmcv_ext_is_the_stand_in_and_its_kernels_raise_naming_the_op() -> None:
    """mmcv-lite (the distribution LoRIS pins) has no compiled kernels: ``mmcv._ext`` is the stand-in,
    every mmcv.ops module holds it, and calling any of its kernels raises CompiledOpMissing naming it."""
    assert importlib.metadata.version("mmcv-lite") == "2.1.0"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("mmcv")  # no full mmcv beside it
    assert mmcv_ext.compiled_ops() is False and mmcv_ext.compiled_cuda_ops() is False
    ext = importlib.import_module("mmcv._ext")
    assert getattr(ext, "stand_in", False) and ext.__spec__.origin == "loris stand-in (mmcv-lite)"
    holders = [m for n, m in sys.modules.items() if n.startswith("mmcv.ops.") and hasattr(m, "ext_module")]
    assert len(holders) > 10 and all(m.ext_module is ext for m in holders)
    for op in ("roi_align_forward", "nms", "ms_deform_attn_forward", "sigmoid_focal_loss_forward"):
        with pytest.raises(CompiledOpMissing, match=f"compiled op '{op}' was called") as info:
            getattr(ext, op)(torch.zeros(2), "anything", key=1)
        assert isinstance(info.value, RuntimeError)
    with pytest.raises(AttributeError):
        ext.__wrapped__  # noqa: B018  (dunders are not kernels: introspection sees a plain module)


def test_ops_without_a_native_route_raise_compiled_op_missing() -> None:
    """What Co-DETR never calls keeps mmcv's kernel call and fails loudly: max-pooled RoIAlign, soft-NMS."""
    feats, rois = torch.rand(1, 2, 8, 8), torch.tensor([[0.0, 1, 1, 6, 6]])
    with native_ops():
        with pytest.raises(CompiledOpMissing, match="'roi_align_forward'"):
            RoIAlign(2, pool_mode="max")(feats, rois)
        with pytest.raises(CompiledOpMissing, match="'softnms'"):
            soft_nms(rois[:, 1:], torch.ones(1))
    import detectors.codetr.native_ops as ops

    was, was_cpu = ops.native_ops_installed(), ops._cpu  # an earlier test may have installed them for good
    ops.restore_compiled_ops()
    try:
        with pytest.raises(CompiledOpMissing, match="'nms'"):  # without the stand-ins, NMS has no kernel
            nms(rois[:, 1:], torch.ones(1), 0.5)
    finally:
        if was:
            ops.use_native_ops(was_cpu)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_loss_matches_the_kernel_formula(reduction: str) -> None:
    gen = torch.Generator().manual_seed(0)
    n, c, gamma, alpha = 50, 3, 2.0, 0.25
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, c + 1, (n,), generator=gen)  # c = background
    weight = torch.rand(c, generator=gen, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    with native_ops():
        # The name mmdet's FocalLoss calls on CUDA tensors.
        got = FOCAL._sigmoid_focal_loss(x, target, gamma, alpha, weight, reduction)
    # mmcv's sigmoid_focal_loss_forward: -alpha (1-p)^g log p for the target class, else -(1-alpha) p^g log(1-p).
    xr = logits.clone().requires_grad_()
    p = xr.sigmoid()
    pos = torch.nn.functional.one_hot(target, c + 1)[:, :c].bool()
    per = torch.where(pos, -alpha * (1 - p) ** gamma * p.log(), -(1 - alpha) * p**gamma * (1 - p).log()) * weight
    want = {"none": per, "mean": per.sum() / n, "sum": per.sum()}[reduction]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-10)


def test_install_is_idempotent_and_restorable() -> None:
    before = native_ops_installed()
    original = MSDA.MultiScaleDeformableAttnFunction
    with native_ops():
        patched = MSDA.MultiScaleDeformableAttnFunction
        with native_ops(cpu="native"):
            assert MSDA.MultiScaleDeformableAttnFunction is patched  # not wrapped twice
        assert MSDA.MultiScaleDeformableAttnFunction is patched and native_ops_installed()
    assert native_ops_installed() == before
    if not before:
        assert MSDA.MultiScaleDeformableAttnFunction is original
    with pytest.raises(ValueError):
        with native_ops(cpu="fast"):  # type: ignore[arg-type]
            pass


def _pretend_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor says it is on CUDA and CUDA says it is there, so mmcv and mmdet take the branches
    they take on a GPU (deformable attention's kernel, mmcv's focal loss); tensors stay on the CPU."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(MSDA, "IS_CUDA_AVAILABLE", True)


def _build() -> CoDetrDetector:
    """The tiniest Co-DINO with every auxiliary head, built as tests/detectors/test_codetr.py does, at 64 px."""
    torch.manual_seed(0)
    cfg = load_config(CONFIG)
    cfg["train"] = {**cfg["train"], "num_threads": None}
    cfg["image_size"] = 64
    return build_detector("codetr", **cfg)  # type: ignore[return-value]


def _step(det: CoDetrDetector) -> tuple[dict, torch.Tensor, list]:
    """Forward, loss and backward on 2 images, then inference."""
    rng = np.random.default_rng(0)
    images = (rng.random((2, 64, 64)) * 0.3).astype(np.float32)
    images[:, 20:30, 10:50] += 0.6
    x = det._inputs(images)
    boxes = torch.tensor([[10.0, 20, 50, 30], [10, 20, 50, 30]])
    model: Any = det.model
    model.train()
    losses = model.loss(x, det._samples(boxes, 2))
    parts = [v.sum() if torch.is_tensor(v) else torch.stack([t.sum() for t in v]).sum() for k, v in losses.items()]
    total = torch.stack([p for k, p in zip(losses, parts) if "loss" in k]).sum()
    total.backward()
    model.eval()
    with torch.no_grad():
        preds = model.predict(x, det._samples(None, 2), rescale=False)
    return losses, total, preds


@pytest.mark.parametrize("gpu_branches", [False, True], ids=["cpu", "pretend-cuda"])
def test_co_dino_trains_without_any_compiled_mmcv_kernel(monkeypatch: pytest.MonkeyPatch, gpu_branches: bool) -> None:
    # Every mmcv op module's compiled extension is the stand-in whose kernels raise CompiledOpMissing: on
    # mmcv-lite it already is (asserted); a full mmcv's kernels would be swapped for it.
    stand_in = importlib.import_module("mmcv._ext")
    if not getattr(stand_in, "stand_in", False):
        stand_in = mmcv_ext._StandInExt(mmcv_ext.NAME)
    holders = [m for n, m in list(sys.modules.items()) if n.startswith("mmcv.ops.") and hasattr(m, "ext_module")]
    assert holders
    for module in holders:
        if module.ext_module is not stand_in:
            assert mmcv_ext.compiled_ops(), f"{module.__name__} holds a compiled extension on mmcv-lite"
            monkeypatch.setattr(module, "ext_module", stand_in)
    if gpu_branches:
        _pretend_cuda(monkeypatch)
    with native_ops():  # restores the stand-ins' previous state afterwards
        # Without the native routes the same step reaches a compiled kernel (RoIAlign and NMS on the CPU,
        # every op on the GPU branches), and the stand-in refuses it, naming the op.
        det = _build()
        restore_compiled_ops()
        first = "ms_deform_attn_forward" if gpu_branches else "nms"  # the encoder; the RPN's proposals
        with pytest.raises(CompiledOpMissing, match=f"compiled op '{first}' was called"):
            _step(det)
        # CUDA-flagged tensors go native whatever the CPU setting says, and on mmcv-lite CPU tensors too.
        det = _build()
        use_native_ops(cpu="compiled" if gpu_branches or not mmcv_ext.compiled_ops() else "native")
        NATIVE_CALLS.clear()
        losses, total, preds = _step(det)
    # On the CPU, mmcv and mmdet run deformable attention and focal loss natively by themselves.
    assert set(NATIVE_CALLS) == (set(TARGETS) if gpu_branches else {"roi_align", "nms"}), NATIVE_CALLS
    assert {"loss_rpn_cls", "rcnn.loss_cls", "atss.loss_cls", "pos_rcnn.loss_cls", "pos_atss.loss_cls"} <= set(losses)
    assert torch.isfinite(total)
    model: Any = det.model
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(model.roi_head.bbox_head.shared_fcs[0].weight.grad.abs().sum()) > 0  # the RoIAlign branch learns
    assert len(preds) == 2 and all(len(p.pred_instances) > 0 for p in preds)
