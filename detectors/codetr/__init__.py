"""Co-DETR (Co-DINO form) for LoRIS on mmdet 3.3.0, written as LoRIS's own registered modules.

``detectors.codetr.detector`` holds the LoRIS interface (registered as ``"codetr"``); the mmdet
modules live in ``co_detector``, ``co_dino_head``, ``aux_heads`` and ``query_embed`` and are
imported (and registered) only when a model is built, via ``detectors.codetr.modules``. Importing
this package first installs the ``mmcv._ext`` stand-in (:mod:`detectors.codetr.mmcv_ext`), which
costs nothing until mmcv.ops is imported.
"""

from detectors.codetr import mmcv_ext

mmcv_ext.install()

from detectors.codetr.detector import CoDetrDetector, build_model, load_config  # noqa: E402

__all__ = ["CoDetrDetector", "build_model", "load_config"]
