"""Co-DINO detector: losses of every branch, optimisation, inference bounds, persistence, CPU-only (on mmcv-lite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors import build_detector
from detectors.codetr import CoDetrDetector, load_config, mmcv_ext  # installs the mmcv._ext stand-in first
from scans.records import ScanArrays
from tests.helpers import toy_box_scans

# Hard imports, no importorskip: LoRIS installs mmcv-lite and mmdet, and mmcv.ops imports on it through
# the stand-in, so a missing or broken install fails these tests instead of skipping them.
mmcv_ext.install()
import mmcv.ops  # noqa: E402, F401
import mmdet  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "detectors" / "codetr.py"
PAPER_CONFIG = ROOT / "configs" / "detectors" / "codetr_paper.py"

# Keys the query head, denoising, encoder proposals, RPN, RoI head, ATSS and both positive-query
# branches must produce (last decoder layer; d0.* covers the earlier layer of the 2-layer config).
EXPECTED_KEYS = {
    "loss_cls",
    "loss_bbox",
    "loss_iou",
    "d0.loss_cls",
    "d0.loss_bbox",
    "d0.loss_iou",
    "enc_loss_cls",
    "enc_loss_bbox",
    "enc_loss_iou",
    "dn_loss_cls",
    "dn_loss_bbox",
    "dn_loss_iou",
    "d0.dn_loss_cls",
    "loss_rpn_cls",
    "loss_rpn_bbox",
    "rcnn.loss_cls",
    "rcnn.loss_bbox",
    "atss.loss_cls",
    "atss.loss_bbox",
    "atss.loss_centerness",
    "pos_rcnn.loss_cls",
    "pos_rcnn.loss_bbox",
    "pos_rcnn.loss_iou",
    "pos_rcnn.d0.loss_cls",
    "pos_rcnn.d0.loss_bbox",
    "pos_rcnn.d0.loss_iou",
    "pos_atss.loss_cls",
    "pos_atss.loss_bbox",
    "pos_atss.loss_iou",
    "pos_atss.d0.loss_cls",
    "pos_atss.d0.loss_bbox",
    "pos_atss.d0.loss_iou",
}
AUX_PREFIXES = ("loss_rpn", "rcnn.", "atss.", "pos_rcnn.", "pos_atss.")


def _detector(image_size: int = 128, **train: object) -> CoDetrDetector:
    cfg = load_config(CONFIG)
    cfg["train"] = {**cfg["train"], "num_threads": None, "max_minutes": None, **train}
    cfg["image_size"] = image_size
    return build_detector("codetr", **cfg)  # type: ignore[return-value]


def _batch(det: CoDetrDetector, data: ScanArrays) -> tuple[torch.Tensor, list]:
    x = det._inputs(data.images)
    scale = det.image_size / data.images.shape[-1]
    return x, det._samples(torch.as_tensor(data.boxes * scale), x.shape[0])


def _total(losses: dict) -> torch.Tensor:
    return sum(v.sum() if torch.is_tensor(v) else sum(t.sum() for t in v) for k, v in losses.items() if "loss" in k)


def _finite(v: object) -> bool:
    items = v if isinstance(v, (list, tuple)) else [v]
    return all(bool(torch.isfinite(t).all()) for t in items)  # type: ignore[arg-type]


def test_one_step_produces_finite_losses_for_every_branch() -> None:
    torch.manual_seed(0)
    det = _detector()
    x, samples = _batch(det, toy_box_scans(2, 128))
    det.model.train()
    losses = det.model.loss(x, samples)
    missing = EXPECTED_KEYS - set(losses)
    assert not missing, f"missing loss keys: {sorted(missing)}"
    bad = [k for k, v in losses.items() if "loss" in k and not _finite(v)]
    assert not bad, f"non-finite losses: {bad}"
    total = _total(losses)
    total.backward()
    # The positive-query projections of both heads receive gradient from their branch.
    for p in det.model.pos_query_embed.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_aux_heads_off_is_plain_dino() -> None:
    cfg = load_config(CONFIG)
    det = build_detector("codetr", **{**cfg, "aux_heads": False})
    assert not det.model.with_aux and det.model.rpn_head is None and det.model.atss_head is None
    x, samples = _batch(det, toy_box_scans(2, 128))
    det.model.train()
    losses = det.model.loss(x, samples)
    assert {"loss_cls", "dn_loss_cls", "enc_loss_cls"} <= set(losses)
    assert not [k for k in losses if k.startswith(AUX_PREFIXES)]


def test_a_few_steps_on_one_batch_reduce_the_loss() -> None:
    torch.manual_seed(0)
    det = _detector(image_size=64)  # 64 px keeps full Co-DINO steps cheap
    x, samples = _batch(det, toy_box_scans(2, 64, seed=1))
    model = det.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(6):
        total = _total(model.loss(x, samples))
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(float(total))
    # Denoising noise and samplers make single steps noisy: compare the ends of the run.
    assert np.mean(history[-2:]) < np.mean(history[:2]), history


def test_predict_returns_at_most_n_boxes_inside_the_image() -> None:
    det = _detector()
    size = 96  # not the model size: boxes must come back in the caller's pixels
    dets = det.predict(toy_box_scans(3, size).images)
    assert len(dets) == 3
    for d in dets:
        assert 0 < len(d) <= det.max_detections
        assert (d.boxes >= 0).all() and (d.boxes <= size).all()
        assert (d.boxes[:, 2] >= d.boxes[:, 0]).all() and (d.boxes[:, 3] >= d.boxes[:, 1]).all()
        assert (np.diff(d.scores) <= 0).all()


def test_fit_save_load_predict_identical(tmp_path: Path) -> None:
    det = _detector(epochs=1, batch_size=4, warmup_iters=1, val_interval=1)
    data = toy_box_scans(8, 128, seed=2)
    summary = det.fit(data, data.subset([0, 1]), tmp_path / "work")
    assert summary["iterations"] == 2 and (tmp_path / "work" / "train_log.jsonl").is_file()
    det.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["image_size"] == 128
    torch.load(tmp_path / "ckpt" / "weights.pt", weights_only=True)  # a plain state dict
    again = CoDetrDetector.load(tmp_path / "ckpt")
    a, b = det.predict(data.images), again.predict(data.images)
    for da, db in zip(a, b):
        np.testing.assert_array_equal(da.boxes, db.boxes)
        np.testing.assert_array_equal(da.scores, db.scores)


def test_geometric_jitter_moves_the_box_with_the_content() -> None:
    from detectors.codetr.detector import _random_affine

    boxes = torch.tensor([[10.0, 20, 40, 30], [5, 5, 20, 60], [30, 30, 50, 40]])
    x = torch.zeros(3, 1, 64, 64)
    for i, b in enumerate(boxes.long()):
        x[i, 0, b[1] : b[3], b[0] : b[2]] = 1.0
    y, moved = _random_affine(x, boxes, 0.2, 0.1, torch.Generator().manual_seed(0))
    assert not torch.allclose(moved, boxes)
    for i in range(3):
        rows, cols = torch.nonzero(y[i, 0] > 0.5, as_tuple=True)
        seen = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
        assert torch.allclose(moved[i], seen, atol=1.0)  # within a pixel of where the rectangle went


def test_paper_config_builds() -> None:
    cfg = load_config(PAPER_CONFIG)
    model = CoDetrDetector(**cfg).model
    assert model.num_queries == 900 and model.decoder.num_layers == 6 and model.with_aux


_NO_CUDA_SCRIPT = r"""
import torch
def _refuse(*a, **k):
    raise AssertionError(".cuda() was called")
torch.Tensor.cuda = _refuse
torch.nn.Module.cuda = _refuse
assert not torch.cuda.is_available()
from detectors import build_detector
from detectors.codetr import load_config
import numpy as np
cfg = load_config("configs/detectors/codetr.py")
det = build_detector("codetr", **cfg)
x = det._inputs(np.random.default_rng(0).random((2, 128, 128), dtype=np.float32))
boxes = torch.tensor([[20., 40., 90., 60.], [10., 50., 100., 80.]])
det.model.train()
losses = det.model.loss(x, det._samples(boxes, 2))
assert all(torch.isfinite(v if torch.is_tensor(v) else torch.stack([t.sum() for t in v])).all()
           for k, v in losses.items() if "loss" in k)
print(len(det.predict(np.zeros((1, 128, 128), np.float32))[0]), det.max_detections)
"""


def test_runs_without_cuda() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", _NO_CUDA_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    n_detections, cap = map(int, out.stdout.strip().splitlines()[-1].split())
    assert 0 <= n_detections <= cap  # predict ran on the CPU-only build and honoured its detection cap


def _msda(batch_first: bool) -> torch.nn.Module:
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention

    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(embed_dims=64, num_levels=3, batch_first=batch_first).eval()
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.3)  # offsets that also leave the maps (zero padding)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.3)
    return m


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("ref_dims,queries", [(2, 336), (4, 30)], ids=["encoder", "decoder"])
def test_fast_deformable_attention_equals_mmcv(
    batch_first: bool, ref_dims: int, queries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detectors.codetr import fast_attention

    calls = []
    inner = fast_attention.deformable_attention
    monkeypatch.setattr(fast_attention, "deformable_attention", lambda *a, **k: calls.append(1) or inner(*a, **k))

    m = _msda(batch_first)
    g = torch.Generator().manual_seed(1)
    shapes = torch.tensor([[16, 16], [8, 8], [4, 4]])
    q, pos = torch.randn(2, queries, 64, generator=g), torch.randn(2, queries, 64, generator=g)
    v = torch.randn(2, 336, 64, generator=g)
    if not batch_first:
        q, v, pos = q.transpose(0, 1), v.transpose(0, 1), pos.transpose(0, 1)
    kw = dict(
        value=v,
        query_pos=pos,
        reference_points=torch.rand(2, queries, 3, ref_dims, generator=g),
        spatial_shapes=shapes,
        level_start_index=torch.tensor([0, 256, 320]),
        key_padding_mask=torch.rand(2, 336, generator=g) < 0.1,
    )
    fast_attention.install()
    with torch.enable_grad():
        reference = m(q, **kw)  # autograd on: mmcv's own forward
    assert reference.grad_fn is not None
    with torch.no_grad():
        fast = m(q, **kw)
    fast_attention.uninstall()
    try:
        with torch.no_grad():
            original = m(q, **kw)
    finally:
        fast_attention.install()
    torch.testing.assert_close(reference, original, rtol=0, atol=0)  # the autograd path is mmcv's, untouched
    torch.testing.assert_close(fast, original, rtol=0, atol=1e-5)
    assert len(calls) == 1  # only the no-grad call took the fast path


def test_fused_backbone_matches_and_follows_weight_changes() -> None:
    det = _detector()
    model = det.model
    model.eval()
    for mod in model.backbone.modules():  # running statistics away from the identity, as after training
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    x = det._inputs(toy_box_scans(2, 128).images)

    def check() -> None:
        with torch.enable_grad():
            reference = model.extract_feat(x)
        with torch.no_grad():
            fast = model.extract_feat(x)
        assert "_fused_backbone" in model.__dict__
        for a, b in zip(fast, reference):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-5)

    check()
    with torch.no_grad():
        model.backbone.conv1.weight.mul_(1.5)  # an in-place update (as an optimiser step) must be seen
    check()
    assert not any(k.startswith("_fused") for k in model.state_dict())  # the copy is not part of the weights


def test_predict_with_fast_paths_equals_mmcv_paths() -> None:
    det = _detector()
    for mod in det.model.backbone.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    det.model.eval()
    x = det._inputs(toy_box_scans(4, 128, seed=3).images)
    with torch.enable_grad():
        reference = det.model.predict(x, det._samples(None, 4), rescale=False)
    with torch.no_grad():
        fast = det.model.predict(x, det._samples(None, 4), rescale=False)
    for a, b in zip(fast, reference):
        pa, pb = a.pred_instances, b.pred_instances
        torch.testing.assert_close(pa.scores, pb.scores.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(pa.bboxes, pb.bboxes.detach(), rtol=0, atol=1e-3)  # pixels of 128
