"""Location-prior detectors: ground truth, YOLOv5u (ultralytics) and Co-DETR (mmdet)."""

import detectors.codetr  # noqa: E402,F401

# Imported for their @register side effect; neither imports ultralytics until it is used.
import detectors.gt  # noqa: E402,F401
import detectors.yolov5  # noqa: E402,F401
from detectors.base import DETECTORS, Detections, Detector, build_detector, register
from detectors.prior import Prior, PriorPolicy, expand_box

__all__ = ["DETECTORS", "Detections", "Detector", "Prior", "PriorPolicy", "build_detector", "expand_box", "register"]
