"""Torch-native stand-ins for mmcv's compiled ops (detectors/codetr/native_ops.py), checked on CPU.

Tolerances: float64 comparisons (deformable attention, focal loss) within 1e-10; float32 comparisons
against mmcv's compiled CPU kernels (RoIAlign) within 1e-5 absolute; NMS indices exactly equal.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("mmcv.ops", reason="mmcv with ops is needed for Co-DETR")
pytest.importorskip("mmdet")
pytest.importorskip("torchvision")

from mmcv.ops import RoIAlign, batched_nms, nms  # noqa: E402

from detectors import build_detector  # noqa: E402
from detectors.codetr import CoDetrDetector, load_config  # noqa: E402
from detectors.codetr.native_ops import (  # noqa: E402
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
PATHS: tuple[CpuPath, ...] = ("compiled", "native")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detectors" / "codetr.py"


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


@pytest.mark.parametrize(
    "aligned,sampling_ratio,scale", [(True, 0, 1 / 8), (True, 2, 0.5), (False, 0, 0.25), (False, -1, 1.0)]
)
def test_roi_align_matches_mmcv_cpu_kernel(aligned: bool, sampling_ratio: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 40
    xy = torch.rand(n, 2, generator=gen) * 90 - 10  # some boxes start left of / above the image
    wh = torch.rand(n, 2, generator=gen) * 60
    wh[:5] = 0.3  # tiny boxes: the not-aligned path clamps them to one pixel
    rois = torch.cat([torch.randint(0, 2, (n, 1), generator=gen).float(), xy, xy + wh], 1)
    feats = torch.randn(2, 5, 13, 11, generator=gen)
    upstream = torch.randn(n, 5, 7, 7, generator=gen)
    results = {}
    for path in PATHS:
        x = feats.clone().requires_grad_()
        with native_ops(cpu=path):
            y = RoIAlign(7, spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)(x, rois)
        (y * upstream).sum().backward()
        results[path] = (y.detach(), x.grad)
    torch.testing.assert_close(results["native"][0], results["compiled"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results["native"][1], results["compiled"][1], rtol=0, atol=1e-5)
    assert results["native"][0].abs().sum() > 0


def _boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=gen) * 40], 1)
    return boxes, torch.rand(n, generator=gen), torch.randint(0, 4, (n,), generator=gen)


@pytest.mark.parametrize(
    "iou,offset,score_thr,max_num", [(0.7, 0, 0.0, -1), (0.3, 1, 0.0, -1), (0.5, 0, 0.4, 20), (0.5, 1, 0.2, 7)]
)
def test_nms_matches_mmcv_cpu_kernel(iou: float, offset: int, score_thr: float, max_num: int) -> None:
    boxes, scores, _ = _boxes(300, seed=int(iou * 10) + offset)
    out = {}
    for path in PATHS:
        with native_ops(cpu=path):
            out[path] = nms(boxes, scores, iou, offset=offset, score_threshold=score_thr, max_num=max_num)
    assert torch.equal(out["native"][1], out["compiled"][1])
    assert torch.equal(out["native"][0], out["compiled"][0])
    assert 0 < len(out["native"][1]) < 300


@pytest.mark.parametrize("cfg", [{}, {"split_thr": 50}, {"class_agnostic": True}, {"max_num": 10}])
def test_batched_nms_matches_mmcv_cpu_kernel(cfg: dict) -> None:
    boxes, scores, idxs = _boxes(400, seed=3)
    out = {}
    for path in PATHS:
        with native_ops(cpu=path):
            out[path] = batched_nms(boxes, scores, idxs, dict(type="nms", iou_threshold=0.6, **cfg))
    assert torch.equal(out["native"][1], out["compiled"][1])
    assert torch.equal(out["native"][0], out["compiled"][0])


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


class _NoKernel:
    """Stands in for mmcv's compiled extension: any kernel call fails."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        def refuse(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"compiled mmcv kernel called: {name}")

        return refuse


def _pretend_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor says it is on CUDA and CUDA says it is there, so mmcv and mmdet take the branches
    they take on a GPU (deformable attention's kernel, mmcv's focal loss); tensors stay on the CPU."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(MSDA, "IS_CUDA_AVAILABLE", True)


def _build() -> CoDetrDetector:
    """The tiniest Co-DINO with every auxiliary head, built as tests/test_codetr.py does, at 64 px."""
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
    for name, module in list(sys.modules.items()):
        if name.startswith("mmcv") and hasattr(module, "ext_module"):
            monkeypatch.setattr(module, "ext_module", _NoKernel())
    if gpu_branches:
        _pretend_cuda(monkeypatch)
    with native_ops():  # restores the stand-ins' previous state afterwards
        # Without the stand-ins the same step reaches a compiled kernel (RoIAlign and NMS on the CPU,
        # every op on the GPU branches): the refusal above is live.
        det = _build()
        restore_compiled_ops()
        with pytest.raises(RuntimeError, match="compiled mmcv kernel called"):
            _step(det)
        # CUDA-flagged tensors go native whatever the CPU setting says.
        det = _build()
        use_native_ops(cpu="compiled" if gpu_branches else "native")
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
