"""The LoRIS inpainting U-Net: grayscale in, grayscale out, tanh head (values in [-1, 1]).

Architecture (authors' code, see docs/design.md): a 3x3 stride-1 stem, then ``depth`` stages of
4x4 stride-2 conv + 3x3 conv (each conv followed by BatchNorm and ReLU); the decoder mirrors it
with 4x4 stride-2 transposed convs, concatenation of the encoder skip and two 3x3 conv+BN+ReLU;
a 3x3 conv + tanh produces the image. Widths double per stage from ``base`` and are capped at
``base * max_mult`` (paper: 64-128-256-512-512, about 28.8 M parameters).

``encoder="efficientnet_lite0"`` (profile ``"lite0"``) swaps the stride-2 stages for the ImageNet-pretrained
EfficientNet-Lite0 feature net (:mod:`reconstruction.encoders`, strides 2-32, so ``depth`` is 5); the
decoder upsamples bilinearly, concatenates the encoder skip (the full-resolution skip is the stem's)
and applies two 3x3 conv+BN+ReLU with the widths of ``widths()``.

>>> import torch
>>> net = UNet(UNetConfig.profile("tiny")).eval()
>>> y = net(torch.zeros(2, 1, 64, 64))
>>> tuple(y.shape), bool(y.abs().max() <= 1)
((2, 1, 64, 64), True)
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from reconstruction.encoders import ENCODERS, LITE0_CHANNELS, LITE0_DEPTH, gray_to_rgb, lite0_encoder

# Named width/depth profiles. "cpu" trades width for speed on a CPU (pipeline/bench/unet.py
# measures it): base 16 keeps the paper's depth and layout at ~1/16 of the paper model's FLOPs.
_PROFILES: dict[str, dict[str, int | str]] = {
    "paper": {"base": 64, "depth": 4, "max_mult": 8},
    "cpu": {"base": 16, "depth": 4, "max_mult": 8},
    "wide": {"base": 32, "depth": 4, "max_mult": 8},  # the budget curve's second width (issue 25)
    "tiny": {"base": 8, "depth": 3, "max_mult": 4},
    # ImageNet-pretrained EfficientNet-Lite0 encoder; decoder widths 16-32-64-128-128 keep it CPU-cheap
    "lite0": {"base": 16, "depth": LITE0_DEPTH, "max_mult": 8, "encoder": "efficientnet_lite0"},
}


@dataclass(frozen=True)
class UNetConfig:
    """Width and depth of the U-Net.

    ``base`` is the stem width; stage ``i`` has ``min(base * 2**i, base * max_mult)`` channels;
    ``depth`` is the number of stride-2 downsamplings (input sides must be divisible by
    ``2**depth``). ``encoder`` is ``"none"`` (the authors' encoder above) or ``"efficientnet_lite0"``
    (pretrained; needs ``depth`` 5 and one input channel).

    >>> UNetConfig.profile("paper").widths()
    (64, 128, 256, 512, 512)
    >>> "encoder" in UNetConfig.profile("cpu").to_dict(), UNetConfig.profile("lite0").to_dict()["encoder"]
    (False, 'efficientnet_lite0')
    """

    base: int = 16
    depth: int = 4
    max_mult: int = 8
    in_channels: int = 1
    out_channels: int = 1
    encoder: str = "none"

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown U-Net encoder {self.encoder!r}; choose from {list(ENCODERS)}")
        if self.encoder != "none" and (self.depth != LITE0_DEPTH or self.in_channels != 1):
            raise ValueError(f"encoder {self.encoder!r} needs depth {LITE0_DEPTH} and in_channels 1")

    @staticmethod
    def profile(name: str) -> UNetConfig:
        """A named profile by base width: ``"paper"`` 64 (~28.8 M params), ``"wide"`` 32, ``"cpu"`` 16, ``"tiny"``
        8 (depth 3); ``"lite0"``: the pretrained EfficientNet-Lite0 encoder with a base-16 decoder."""
        if name not in _PROFILES:
            raise ValueError(f"unknown U-Net profile {name!r}; choose from {sorted(_PROFILES)}")
        return UNetConfig.from_dict(_PROFILES[name])

    def widths(self) -> tuple[int, ...]:
        return tuple(min(self.base * 2**i, self.base * self.max_mult) for i in range(self.depth + 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["encoder"] == "none":  # left out so configs and checkpoints saved before the option stay byte-identical
            del d["encoder"]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> UNetConfig:
        """The config of ``to_dict`` (or of a dict saved before ``encoder`` existed: ``"none"``)."""
        fields = UNetConfig.__dataclass_fields__
        kept: dict[str, Any] = {k: str(v) if k == "encoder" else int(v) for k, v in d.items() if k in fields}
        return replace(UNetConfig(), **kept)


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    # bias is redundant right before BatchNorm
    pad = (k - 1) // 2 if stride == 1 else (k - stride) // 2
    return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _Up(nn.Module):
    """4x4 stride-2 transposed conv, concat skip, 2x (3x3 conv + BN + ReLU)."""

    def __init__(self, cin: int, cskip: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(cin, cskip, 4, 2, 1, bias=False), nn.BatchNorm2d(cskip), nn.ReLU(inplace=True)
        )
        self.conv = nn.Sequential(*_cbr(2 * cskip, cskip), *_cbr(cskip, cskip))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class _UpCat(nn.Module):
    """The pretrained variant's decoder stage: bilinear x2 upsampling, concat skip, 2x (3x3 conv + BN + ReLU)."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = nn.Sequential(*_cbr(cin + cskip, cout), *_cbr(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """Inpainting U-Net; ``forward(x[B, C, H, W] in [-1, 1]) -> [B, C, H, W] in [-1, 1]``.

    With a pretrained ``config.encoder``, ``pretrained=False`` skips loading its ImageNet weights (for a
    model whose state is loaded next, e.g. from a checkpoint); it is ignored for ``encoder="none"``.
    """

    def __init__(self, config: UNetConfig | None = None, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config or UNetConfig.profile("cpu")
        w = self.config.widths()
        self.stem = nn.Sequential(*_cbr(self.config.in_channels, w[0]))
        if self.config.encoder == "none":
            self.down = nn.ModuleList(
                nn.Sequential(*_cbr(w[i], w[i + 1], k=4, stride=2), *_cbr(w[i + 1], w[i + 1]))
                for i in range(self.config.depth)
            )
            self.up = nn.ModuleList(_Up(w[i + 1], w[i]) for i in reversed(range(self.config.depth)))
        else:
            self.encoder = lite0_encoder(pretrained)
            # stage i (stride 2**i) joins the deeper stage's output and the skip at its stride (stem at 1)
            skip = (w[0], *LITE0_CHANNELS[:-1])
            cin = (*w[1:LITE0_DEPTH], LITE0_CHANNELS[-1])
            self.up = nn.ModuleList(_UpCat(cin[i], skip[i], w[i]) for i in reversed(range(LITE0_DEPTH)))
        self.head = nn.Conv2d(w[0], self.config.out_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        m = 2**self.config.depth
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input sides {tuple(x.shape[-2:])} must be divisible by {m}")
        skips = [self.stem(x)]
        if self.config.encoder == "none":
            for block in self.down:
                skips.append(block(skips[-1]))
        else:
            skips.extend(self.encoder(gray_to_rgb(x)))
        h = skips.pop()
        for block in self.up:
            h = block(h, skips.pop())
        return torch.tanh(self.head(h))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters.

    >>> count_parameters(UNet(UNetConfig.profile("tiny"))) > 0
    True
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fold_batchnorm(model: UNet) -> UNet:
    """An eval-only copy with each BatchNorm folded into the conv before it (same outputs, fewer passes).

    >>> import torch
    >>> net = UNet(UNetConfig.profile("tiny")).eval(); x = torch.rand(1, 1, 32, 32)
    >>> bool(torch.allclose(net(x), fold_batchnorm(net)(x), atol=1e-5))
    True
    """
    m = copy.deepcopy(model).eval()
    for seq in m.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_var is None or bn.running_mean is None:
                continue  # batch statistics at inference too: nothing fixed to fold
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                shift = bn.bias - bn.running_mean * scale
                # output channels are dim 0 of a conv weight but dim 1 of a transposed conv weight
                shape = (-1, 1, 1, 1) if isinstance(conv, nn.Conv2d) else (1, -1, 1, 1)
                conv.weight.mul_(scale.view(shape))
                bias = shift if conv.bias is None else conv.bias * scale + shift
                conv.bias = nn.Parameter(bias.clone())
            seq[i + 1] = nn.Identity()
    return m
