"""Prior sources as the detector registry names them: CLI choices, defaults, display names, report labels.

Nothing here lists detectors: a class registered with :func:`detectors.base.register` appears
everywhere (the ground-truth one, ``ground_truth = True``, is the upper baseline).

>>> ground_truth() in names() and ground_truth() not in trainable()
True
"""

from __future__ import annotations

from detectors.base import Detector, detector_class, registered
from evaluation.results import SourceLabel


def names() -> list[str]:
    """Every registered source, the ground truth first, then the registry's order."""
    reg = registered()
    return [n for n, c in reg.items() if c.ground_truth] + [n for n, c in reg.items() if not c.ground_truth]


def trainable() -> list[str]:
    """The sources that are trained detectors (everything but the ground truth)."""
    return [n for n, c in registered().items() if not c.ground_truth]


def ground_truth() -> str:
    """The name of the ground-truth source (``GtDetector.name``)."""
    return next(n for n, c in registered().items() if c.ground_truth)


def is_ground_truth(name: str) -> bool:
    return detector_class(name).ground_truth


def display(name: str) -> str:
    """How the CLI and reports name a source (its class's ``display_name``)."""
    return detector_class(name).display_name


def prior_phrase(name: str) -> str:
    """The source in a sentence: "LoRIS with ``ground-truth`` boxes", "LoRIS with ``YOLOv5u`` boxes"."""
    return "ground-truth" if is_ground_truth(name) else display(name)


def labels() -> dict[str, SourceLabel]:
    """Report labels of every registered source (display name and row in the paper's Table 2)."""
    return {n: SourceLabel(c.display_name, c.paper_row) for n, c in registered().items()}


def instance(name: str) -> Detector:
    """An untrained detector of ``name`` with its defaults (the ground truth needs nothing else)."""
    return detector_class(name)()
