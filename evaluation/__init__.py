"""Evaluation of LoRIS results from arrays (scores, maps, masks, boxes), never from models.

* :mod:`evaluation.metrics` -- image/pixel AUROC, oracle / validation / per-image Dice, ``aggregate``.
* :mod:`evaluation.detection` -- top-1 precision at IoU 0.5 and pycocotools mAP; COCO results JSON.
* :mod:`evaluation.paired` -- DeLong's paired test of ΔAUROC (ground-truth vs detector priors).
* :mod:`evaluation.aggregate` -- the ``reconstruction``/``riad``/``detection`` parts of summary.json.
* :mod:`evaluation.report` -- Tables 1-2, per_image.csv, figures and report.html.
"""

from evaluation.aggregate import json_safe, summary_sections
from evaluation.detection import coco_results, detection_metrics, top1_iou, write_coco_results
from evaluation.figures import Example, select_cases
from evaluation.metrics import (
    DiceResult,
    aggregate,
    dice_oracle,
    dice_per_image,
    dice_val,
    image_auroc,
    per_image_dice,
    pixel_auroc,
    pixel_auroc_streaming,
    pooled_dice,
    segmentation_metrics,
    select_threshold,
)
from evaluation.paired import PairedAuroc, mean_over_folds, mean_over_models, paired_auroc
from evaluation.report import FoldResult, ImageRow, summary_from_folds, write_report

__all__ = [
    "DiceResult",
    "Example",
    "FoldResult",
    "ImageRow",
    "PairedAuroc",
    "aggregate",
    "coco_results",
    "detection_metrics",
    "dice_oracle",
    "dice_per_image",
    "dice_val",
    "image_auroc",
    "json_safe",
    "mean_over_folds",
    "mean_over_models",
    "paired_auroc",
    "per_image_dice",
    "pixel_auroc",
    "pixel_auroc_streaming",
    "pooled_dice",
    "segmentation_metrics",
    "select_cases",
    "select_threshold",
    "summary_from_folds",
    "summary_sections",
    "top1_iou",
    "write_coco_results",
    "write_report",
]
