"""Location-prior detectors: ground truth, YOLOv5u (ultralytics) and Co-DETR (mmdet), and any other.

Every module of this package is imported here, so its ``@register`` runs: a new detector is one
module (a :class:`detectors.base.Detector` subclass with ``@register("name")``) and, optionally, its
``configs/detectors/<name>.yaml``. Nothing imports ultralytics or builds a network until it is used.
"""

import importlib
import pkgutil

from detectors.base import DETECTORS, Detections, Detector, build_detector, register
from detectors.prior import Prior, PriorPolicy, expand_box

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DETECTORS", "Detections", "Detector", "Prior", "PriorPolicy", "build_detector", "expand_box", "register"]
