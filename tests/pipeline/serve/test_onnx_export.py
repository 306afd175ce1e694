"""ONNX export: onnxruntime agrees with PyTorch for the U-Net, the LoRIS graph and the detectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pipeline.serve.onnx_export import (  # noqa: E402
    LorisGraph,
    export_bundle,
    export_codetr,
    export_digest,
    export_unet,
    onnx_session,
)
from reconstruction.checkpoint import save_model  # noqa: E402
from reconstruction.deviation import image_score  # noqa: E402
from reconstruction.infer import reconstruct  # noqa: E402
from reconstruction.unet import UNet, UNetConfig  # noqa: E402

SIZE = 64


def _unet() -> UNet:
    """A tiny U-Net whose BatchNorm statistics are not the identity (so folding them is tested)."""
    torch.manual_seed(0)
    net = UNet(UNetConfig.profile("tiny")).train()
    with torch.no_grad():
        net(torch.rand(4, 1, SIZE, SIZE) * 2 - 1)
    return net.eval()


def _images(n: int = 3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    imgs = np.random.default_rng(seed).random((n, SIZE, SIZE), dtype=np.float32)
    boxes = np.array([[10, 12, 40, 30], [0, 0, SIZE, SIZE], [np.nan] * 4], np.float32)[:n]
    return imgs, boxes


def test_unet_parity(tmp_path: Path) -> None:
    net = _unet()
    path = export_unet(net, tmp_path / "unet.onnx", SIZE)
    x = np.random.default_rng(0).random((3, 1, SIZE, SIZE), dtype=np.float32) * 2 - 1  # batch 3, exported at 1
    got = onnx_session(path).run(["recon"], {"image": x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_session_without_cuda_provider_says_so(tmp_path: Path) -> None:
    path = export_unet(_unet(), tmp_path / "unet.onnx", SIZE)
    assert onnx_session(path, threads=1, device="auto").get_providers()[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="no CUDA provider"):
            onnx_session(path, device="cuda")


@pytest.mark.parametrize(("pooling", "region"), [("mean", "image"), ("max", "box"), ("topk", "box"), ("topk", "image")])
def test_graph_score_matches_image_score(pooling: str, region: str) -> None:
    net = _unet()
    imgs, boxes = _images()
    imgs = imgs[:, :32, :32].copy()  # a small image: this checks the pooling, not the network
    boxes = np.minimum(boxes, 32)
    graph = LorisGraph(net, ("dd", "l2"), "l2", pooling, region, topk_fraction=0.05, margin=1.0)
    with torch.no_grad():
        scores, maps = graph(torch.from_numpy(imgs)[:, None], torch.from_numpy(boxes))
    rec = reconstruct(net, imgs, boxes, maps=("dd", "l2"), margin=1.0, device="cpu")
    want = image_score(rec.maps["l2"], boxes, pooling=pooling, region=region, topk_fraction=0.05, margin=1.0)  # type: ignore[arg-type]
    np.testing.assert_allclose(scores.numpy(), want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(maps[:, 0].numpy(), rec.maps["dd"], atol=1e-5)


def _bundle(root: Path) -> Path:
    """A bundle folder with a tiny U-Net and an untrained YOLOv5u (the files ``train`` writes), and a
    ``bundle.json`` with every entry ``train`` writes and export checks (the prior too: predict needs it)."""
    from detectors.yolov5 import YoloV5Detector

    save_model(_unet(), root / "unet")
    YoloV5Detector(imgsz=SIZE, device="cpu").init_untrained().save(root / "detector")
    doc = {
        "format": 1,
        "detector": "yolov5",
        "image_size": SIZE,
        "maps": ["msgmsd", "dd"],
        "mask_margin": 1.0,
        "score": {"map": "msgmsd", "threshold": 0.1, "pooling": "topk", "region": "box", "topk_fraction": 0.05},
        "segmentation": {"map": "dd", "threshold": 0.1, "kernel": 3},
        "prior": {"threshold": 0.05, "median_box": [8.0, 16.0, 56.0, 32.0], "expand_up": 0.25, "expand_side": 0.1},
    }
    (root / "bundle.json").write_text(json.dumps(doc))
    return root


def test_export_bundle_parity(tmp_path: Path) -> None:
    from detectors.yolov5 import YoloV5Detector

    bundle = _bundle(tmp_path / "bundle")
    out = tmp_path / "onnx"
    info = export_bundle(bundle, out)
    assert sorted(p.name for p in out.iterdir()) == ["detector.onnx", "export.json", "loris.onnx", "unet.onnx"]
    assert json.loads((out / "export.json").read_text()) == info
    assert info["loris"]["maps"] == ["msgmsd", "dd"] and info["detector"]["file"] == "detector.onnx"
    assert info["bundle_digest"] == export_digest(bundle)  # predict --engine onnxruntime refuses a stale export

    imgs, boxes = _images()
    scores, maps = onnx_session(out / "loris.onnx").run(["scores", "maps"], {"images": imgs[:, None], "boxes": boxes})
    net = _unet()
    rec = reconstruct(net, imgs, boxes, maps=("msgmsd", "dd"), margin=1.0, device="cpu")
    want = image_score(rec.maps["msgmsd"], boxes, pooling="topk", region="box", topk_fraction=0.05, margin=1.0)
    np.testing.assert_allclose(scores, want, atol=1e-4, rtol=0)  # the bar: scores 1e-4, maps 1e-3
    np.testing.assert_allclose(maps[:, 0], rec.maps["msgmsd"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(maps[:, 1], rec.maps["dd"], atol=1e-3, rtol=0)

    det = YoloV5Detector.load(bundle / "detector")
    x = torch.rand(2, 3, SIZE, SIZE)
    got = onnx_session(out / "detector.onnx").run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want_raw = det._raw(x).numpy()
    assert got.shape == want_raw.shape
    np.testing.assert_allclose(got[:, 4], want_raw[:, 4], atol=1e-4, rtol=0)  # scores
    np.testing.assert_allclose(got[:, :4], want_raw[:, :4], atol=1e-3, rtol=0)  # boxes, in pixels


def test_codetr_parity(tmp_path: Path) -> None:
    pytest.importorskip("mmdet")
    from detectors.base import build_detector
    from detectors.codetr.detector import DEFAULT_CONFIG_FILE, load_config

    cfg = load_config(DEFAULT_CONFIG_FILE)
    cfg["image_size"] = SIZE
    det = build_detector("codetr", **cfg)
    path = export_codetr(det, tmp_path / "detector.onnx")
    sess = onnx_session(path)
    for seed in (1, 2):  # inputs other than the traced one
        img = np.random.default_rng(seed).random((1, SIZE, SIZE), dtype=np.float32)
        boxes, scores = sess.run(["boxes", "scores"], {"images": img[:, None]})
        (want,) = det.predict(img)
        order = np.argsort(-scores[0], kind="stable")
        np.testing.assert_allclose(scores[0][order][: len(want)], want.scores, atol=1e-4, rtol=0)
        got = boxes[0][order][: len(want)].clip(0, SIZE)
        np.testing.assert_allclose(got, want.boxes, atol=1e-3, rtol=0)
