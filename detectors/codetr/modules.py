"""Importing this module registers LoRIS's Co-DINO parts in mmdet's ``MODELS`` registry.

Kept apart from the package ``__init__`` so that ``import detectors`` does not import mmdet/mmcv.
"""

from detectors.codetr.aux_heads import Assignment, LorisCoATSSHead, LorisCoRoIHead
from detectors.codetr.co_detector import LorisCoDINO
from detectors.codetr.co_dino_head import LorisCoDINOHead, PositiveQueries
from detectors.codetr.query_embed import LorisDinoDecoder, PositiveQueryEmbed, box_sine_embedding

__all__ = [
    "Assignment",
    "LorisCoATSSHead",
    "LorisCoDINO",
    "LorisCoDINOHead",
    "LorisCoRoIHead",
    "LorisDinoDecoder",
    "PositiveQueries",
    "PositiveQueryEmbed",
    "box_sine_embedding",
]
