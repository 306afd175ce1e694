"""The data layer: scan records, readers, COCO datasets, patient-grouped folds and the phantom."""

from scans.coco import load_coco, save_coco
from scans.dataset import load_dataset, to_arrays
from scans.folds import Fold, make_folds, resolve_folds
from scans.readers import ReadError, read_image
from scans.records import Box, Scan, ScanArrays, box_iou, box_mask, box_to_pixels

__all__ = [
    "Box",
    "Fold",
    "ReadError",
    "Scan",
    "ScanArrays",
    "box_iou",
    "box_mask",
    "box_to_pixels",
    "load_coco",
    "load_dataset",
    "make_folds",
    "read_image",
    "resolve_folds",
    "save_coco",
    "to_arrays",
]
