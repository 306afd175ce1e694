"""The LoRIS inpainting U-Net: grayscale in, grayscale out, tanh head (values in [-1, 1]).

Architecture (authors' code, see docs/design.md): a 3x3 stride-1 stem, then ``depth`` stages of
4x4 stride-2 conv + 3x3 conv (each conv followed by BatchNorm and ReLU); the decoder mirrors it
with 4x4 stride-2 transposed convs, concatenation of the encoder skip and two 3x3 conv+BN+ReLU;
a 3x3 conv + tanh produces the image. Widths double per stage from ``base`` and are capped at
``base * max_mult`` (paper: 64-128-256-512-512, about 28.8 M parameters).

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

# Named width/depth profiles. "cpu" trades width for speed on a CPU (reconstruction/benchmark.py
# measures it): base 16 keeps the paper's depth and layout at ~1/16 of the paper model's FLOPs.
_PROFILES: dict[str, dict[str, int]] = {
    "paper": {"base": 64, "depth": 4, "max_mult": 8},
    "cpu": {"base": 16, "depth": 4, "max_mult": 8},
    "wide": {"base": 32, "depth": 4, "max_mult": 8},  # the budget curve's second width (issue 25)
    "tiny": {"base": 8, "depth": 3, "max_mult": 4},
}


@dataclass(frozen=True)
class UNetConfig:
    """Width and depth of the U-Net.

    ``base`` is the stem width; stage ``i`` has ``min(base * 2**i, base * max_mult)`` channels;
    ``depth`` is the number of stride-2 downsamplings (input sides must be divisible by
    ``2**depth``).

    >>> UNetConfig.profile("paper").widths()
    (64, 128, 256, 512, 512)
    """

    base: int = 16
    depth: int = 4
    max_mult: int = 8
    in_channels: int = 1
    out_channels: int = 1

    @staticmethod
    def profile(name: str) -> UNetConfig:
        """A named profile by base width: ``"paper"`` 64 (~28.8 M params), ``"wide"`` 32, ``"cpu"`` 16, ``"tiny"``
        8 (depth 3)."""
        if name not in _PROFILES:
            raise ValueError(f"unknown U-Net profile {name!r}; choose from {sorted(_PROFILES)}")
        return UNetConfig(**_PROFILES[name])

    def widths(self) -> tuple[int, ...]:
        return tuple(min(self.base * 2**i, self.base * self.max_mult) for i in range(self.depth + 1))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> UNetConfig:
        return replace(UNetConfig(), **{k: int(v) for k, v in d.items() if k in UNetConfig.__dataclass_fields__})


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


class UNet(nn.Module):
    """Inpainting U-Net; ``forward(x[B, C, H, W] in [-1, 1]) -> [B, C, H, W] in [-1, 1]``."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig.profile("cpu")
        w = self.config.widths()
        self.stem = nn.Sequential(*_cbr(self.config.in_channels, w[0]))
        self.down = nn.ModuleList(
            nn.Sequential(*_cbr(w[i], w[i + 1], k=4, stride=2), *_cbr(w[i + 1], w[i + 1]))
            for i in range(self.config.depth)
        )
        self.up = nn.ModuleList(_Up(w[i + 1], w[i]) for i in reversed(range(self.config.depth)))
        self.head = nn.Conv2d(w[0], self.config.out_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        m = 2**self.config.depth
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input sides {tuple(x.shape[-2:])} must be divisible by {m}")
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
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
