"""The types ``compare`` and its report share (:mod:`pipeline.experiment.compare`,
:mod:`pipeline.experiment.compare_report`): the comparison's settings and one method's result on one fold.

>>> Settings([LORIS, "riad", "patchcore"], "quick").peers
['patchcore']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluation.aggregate import RIAD
from evaluation.rescoring import Reps, Scored
from reconstruction.peers import Budget

__all__ = ["LORIS", "MethodFold", "Reps", "Rows", "Scored", "Settings"]

LORIS = "loris"
Rows = dict[str, dict[str, float]]  # {row: metrics} of rows beside a method's own (e.g. another pooling rule)


@dataclass(frozen=True)
class Settings:
    """What the comparison adds to a run: its methods, the peers' named budget and their model options."""

    methods: list[str]
    budget: str | Budget
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def peers(self) -> list[str]:
        return [m for m in self.methods if m not in (LORIS, RIAD)]

    def to_dict(self) -> dict[str, Any]:
        budget = self.budget.to_dict() if isinstance(self.budget, Budget) else self.budget
        return {"methods": self.methods, "budget": budget, "options": {k: dict(v) for k, v in self.options.items()}}


@dataclass
class MethodFold:
    """One method on one fold: test metrics and replicates, each held-out set's, the figure's maps
    (``{scan id: (map, segmentation)}``), its fit and predict record, and the rows it adds beside its own
    (``extra``, ``external_extra``: ``{row: metrics}``, their replicates among the method's)."""

    name: str
    metrics: dict[str, float]
    replicates: Reps
    external: list[Scored] = field(default_factory=list)
    figure: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    extra: Rows = field(default_factory=dict)
    external_extra: list[Rows] = field(default_factory=list)
