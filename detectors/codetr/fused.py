"""An inference copy of a backbone with each BatchNorm folded into its convolution, in channels-last layout.

Used by :meth:`detectors.codetr.co_detector.LorisCoDINO.extract_feat` in eval mode without autograd: the
copy is rebuilt whenever a weight or running statistic of the original changes (any in-place update bumps
a tensor's version), so training and ``load_state_dict`` are always seen. Outputs equal the original's to
float32 rounding (tests/detectors/test_codetr.py; docs/design.md, "Facts the code relies on").

>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
>>> x = torch.rand(2, 1, 8, 8)
>>> bool(torch.allclose(fold_batchnorm(net)(x), net(x), atol=1e-6))
True
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _fused(conv: object, norm: object) -> nn.Conv2d | None:
    """``conv`` with ``norm`` folded in, when they are a plain 2-D convolution and a BatchNorm with running
    statistics; else None."""
    if type(conv) is nn.Conv2d and isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None:
        return fuse_conv_bn_eval(conv, norm)
    return None


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with every foldable BatchNorm merged into the conv before it:
    ``Sequential(conv, bn)`` pairs, and mmcv/mmdet blocks' ``convN`` with their ``normN`` (ResNet stems,
    BasicBlock and Bottleneck), whose ``normN`` properties then return an identity."""
    m = copy.deepcopy(module)
    m.train(False)
    with torch.no_grad():
        for owner in m.modules():
            if isinstance(owner, nn.Sequential):
                for i in range(len(owner) - 1):
                    conv = _fused(owner[i], owner[i + 1])
                    if conv is not None:
                        owner[i], owner[i + 1] = conv, nn.Identity()
            for k in (1, 2, 3):
                norm_name = getattr(owner, f"norm{k}_name", None)
                if not isinstance(norm_name, str):
                    continue
                conv = _fused(getattr(owner, f"conv{k}", None), getattr(owner, norm_name, None))
                if conv is not None:
                    setattr(owner, f"conv{k}", conv)
                    setattr(owner, norm_name, nn.Identity())
    return m.to(memory_format=torch.channels_last)


def _state_key(module: nn.Module) -> tuple[tuple[int, int, int], ...]:
    """Changes whenever a parameter or buffer is replaced or updated in place."""
    return tuple((id(t), t.data_ptr(), t._version) for t in [*module.parameters(), *module.buffers()])


class FusedCache:
    """The folded copy of one module, rebuilt when the module's weights change."""

    def __init__(self) -> None:
        self.key: tuple[tuple[int, int, int], ...] | None = None
        self.module: nn.Module | None = None

    def get(self, module: nn.Module) -> nn.Module:
        key = _state_key(module)
        if self.module is None or key != self.key:
            self.module, self.key = fold_batchnorm(module), key
        return self.module
