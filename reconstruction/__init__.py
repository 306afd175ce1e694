"""Localized reconstruction: the inpainting U-Net, masks, losses, anomaly maps, training and inference.

Public API (the pipeline calls these):

- :class:`UNet`, :class:`UNetConfig` (``UNetConfig.profile("cpu" | "wide" | "paper" | "tiny")``)
- :func:`train_unet` with :class:`TrainConfig` -> :class:`TrainResult`
- :func:`reconstruct` / :func:`riad_reconstruct` -> :class:`Reconstruction`
- :func:`anomaly_map`, :func:`image_score`, :func:`segment`
- :func:`save_model` / :func:`load_model`
"""

from reconstruction.checkpoint import load_model, save_model
from reconstruction.deviation import MAP_NAMES, anomaly_map, image_score
from reconstruction.infer import Reconstruction, reconstruct, riad_reconstruct
from reconstruction.masking import apply_single_mask, box_masks, riad_masks
from reconstruction.segment import segment
from reconstruction.train import TrainConfig, TrainResult, train_unet
from reconstruction.unet import UNet, UNetConfig, count_parameters, fold_batchnorm

__all__ = [
    "MAP_NAMES",
    "Reconstruction",
    "TrainConfig",
    "TrainResult",
    "UNet",
    "UNetConfig",
    "anomaly_map",
    "apply_single_mask",
    "box_masks",
    "count_parameters",
    "fold_batchnorm",
    "image_score",
    "load_model",
    "reconstruct",
    "riad_masks",
    "riad_reconstruct",
    "save_model",
    "segment",
    "train_unet",
]
