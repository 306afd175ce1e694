"""Evaluation of LoRIS results from arrays (scores, maps, masks, boxes), never from models.

* :mod:`evaluation.metrics` -- image/pixel AUROC, oracle / validation / per-image Dice, ``aggregate``.
* :mod:`evaluation.detection` -- top-1 precision at IoU 0.5 and pycocotools mAP; COCO results JSON.
* :mod:`evaluation.controls` -- prior-only controls (box height / area, box-indicator map).
* :mod:`evaluation.bootstrap`, :mod:`evaluation.intervals` -- patient-clustered bootstrap intervals.
* :mod:`evaluation.paired` -- DeLong's paired test of ΔAUROC; :mod:`evaluation.comparison` applies it
  to each prior source against the ground-truth prior.
* :mod:`evaluation.results` -- the result data model (:class:`FoldResult`, :class:`ImageRow`), its JSON
  round-trip and :class:`SourceLabel`, how reports name a prior source.
* :mod:`evaluation.aggregate` -- the ``reconstruction``/``riad``/``detection``/``priors`` parts of summary.json.
* :mod:`evaluation.tables` -- Tables 1-2 (rows, Markdown, CSV), paired differences, per_image.csv.
* :mod:`evaluation.figures`, :mod:`evaluation.report` -- figures, the report files and report.html.
* :mod:`evaluation.claims` -- ``python -m evaluation.claims RUN``: the paper's claims from a finished run.
"""

from evaluation.aggregate import json_safe, summary_from_folds, summary_sections
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
from evaluation.report import write_report
from evaluation.results import FoldResult, ImageRow, SourceLabel

__all__ = [
    "DiceResult",
    "Example",
    "FoldResult",
    "ImageRow",
    "PairedAuroc",
    "SourceLabel",
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
