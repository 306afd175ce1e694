"""The interface every location-prior detector follows, and the detector registry.

Images given to detectors are the pipeline's model-sized arrays: ``[N, S, S]`` float32
grayscale in [0, 1] (see :class:`scans.records.ScanArrays`). Boxes are ``(x1, y1, x2, y2)`` in
those pixels. A detector trains on the scans the caller gives it; the caller applies the
class policy (normal scans only unless ``detector.train_classes: all``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from scans.records import ScanArrays


@dataclass
class Detections:
    """Boxes ``[K, 4]`` (x1, y1, x2, y2) and confidences ``[K]`` for one image, best first."""

    boxes: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        order = np.argsort(-self.scores, kind="stable")
        self.boxes, self.scores = self.boxes[order], self.scores[order]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def check_inference_settings(settings: dict[str, Any], allowed: frozenset[str]) -> None:
    """Refuse settings that would need retraining: only ``allowed`` may change after training."""
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"{unknown} change training; only {sorted(allowed)} can be set after it")


class Detector(ABC):
    """A trainable recess detector. Subclasses register with :func:`register`."""

    name: ClassVar[str]
    # How reports and the CLI name this prior source, and its row in the paper's Table 2 (None: not in it).
    display_name: ClassVar[str]
    paper_row: ClassVar[str | None] = None
    # True for the ground-truth boxes (the upper baseline): nothing to train, boxes come with the scans.
    ground_truth: ClassVar[bool] = False
    # True when ``fit`` trains with DistributedDataParallel, so every torchrun rank must call it.
    distributed_fit: ClassVar[bool] = False
    # Config keys that only change prediction (thresholds, batch size, test-time passes): the
    # pipeline keeps them out of the training cache key and applies them to a cached model.
    INFERENCE_KEYS: ClassVar[frozenset[str]] = frozenset()
    # The detector's settings (what :meth:`set_inference` updates).
    config: dict[str, Any]

    def set_inference(self, **settings: Any) -> None:
        """Change inference-only settings (:attr:`INFERENCE_KEYS`) of a trained detector."""
        check_inference_settings(settings, self.INFERENCE_KEYS)
        if settings:
            self.config.update(settings)

    @abstractmethod
    def fit(self, train: ScanArrays, val: ScanArrays, workdir: Path) -> dict[str, Any]:
        """Train on ``train`` (validating on ``val``); logs go under ``workdir``. Returns a summary."""

    @abstractmethod
    def predict(self, images: np.ndarray) -> list[Detections]:
        """Detections for each image of a ``[N, S, S]`` float32 batch in [0, 1]."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write everything needed to :meth:`load` into ``directory`` (no pickles)."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path) -> Detector:
        """Rebuild a trained detector saved by :meth:`save`."""


DETECTORS: dict[str, type[Detector]] = {}


def register(
    name: str, display: str | None = None, paper_row: str | None = None
) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: make a detector known by ``name`` to the CLI, the pipeline, reports and ``bench``.

    ``display`` names it in tables (default: ``name``); ``paper_row`` is its row in the paper's Table 2.
    """

    def wrap(cls: type[Detector]) -> type[Detector]:
        cls.name = name
        cls.display_name = display or name
        cls.paper_row = paper_row
        DETECTORS[name] = cls
        return cls

    return wrap


def registered() -> dict[str, type[Detector]]:
    """Every registered detector by name, the built-in ones first (importing them registers them)."""
    import detectors  # noqa: F401

    return dict(DETECTORS)


def detector_class(name: str) -> type[Detector]:
    """The registered class called ``name`` (for ``load``), without building a model."""
    import detectors  # noqa: F401  (registers the built-in detectors)

    if name not in DETECTORS:
        raise KeyError(f"unknown detector '{name}'; known: {sorted(DETECTORS)}")
    return DETECTORS[name]


def build_detector(name: str, **config: Any) -> Detector:
    """Instantiate a registered detector by name with its config keys as keyword arguments."""
    return detector_class(name)(**config)
