"""Location-prior detectors: ground truth, YOLOv5u (ultralytics) and Co-DETR (mmdet)."""

from detectors.base import DETECTORS, Detections, Detector, build_detector, register
from detectors.prior import Prior, PriorPolicy, expand_box

__all__ = ["DETECTORS", "Detections", "Detector", "Prior", "PriorPolicy", "build_detector", "expand_box", "register"]
