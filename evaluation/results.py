"""The result data model the pipeline hands to evaluation, its JSON round-trip, and how reports name sources.

A prior source is a detector's registry name (or ``"gt"``, the ground-truth boxes); reports show it
through a :class:`SourceLabel` the pipeline builds from the detector registry.

>>> import json
>>> row = ImageRow(3, "p1", 0, 1, "gt", box=(1.0, 2.0, 3.0, 4.0), scores={"msgmsd": 0.5})
>>> fold = FoldResult(0, methods={"msgmsd": {"i_auroc": float("nan")}}, rows=[row])
>>> back = FoldResult.from_json(json.loads(json.dumps(fold.to_json())))
>>> back.rows[0].box, math.isnan(back.methods["msgmsd"]["i_auroc"]), back == FoldResult.from_json(fold.to_json())
((1.0, 2.0, 3.0, 4.0), True, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GROUND_TRUTH = "gt"  # the prior source of the annotated boxes, the reference of every prior comparison


@dataclass(frozen=True)
class SourceLabel:
    """How reports name a prior source (from the detector registry, passed in by the pipeline)."""

    display: str
    paper_row: str | None = None  # its row in the paper's Table 2, None when the paper has none


Labels = Mapping[str, SourceLabel]


def source_label(name: str, labels: Labels | None = None) -> SourceLabel:
    """The label of source ``name``; an unlabelled source shows its own name and has no paper row.

    >>> source_label("toy"), source_label("gt", {"gt": SourceLabel("GT", "gt")}).display
    (SourceLabel(display='toy', paper_row=None), 'GT')
    """
    return (labels or {}).get(name) or SourceLabel(display=name)


def source_order(names: Iterable[str], labels: Labels | None = None) -> list[str]:
    """Ground truth first (if present), then the order of ``labels``, then the rest sorted.

    >>> source_order(["z", "codetr", "a", "gt"], {"yolov5": SourceLabel("YOLOv5u"), "codetr": SourceLabel("Co-DETR")})
    ['gt', 'codetr', 'a', 'z']
    """
    present = set(names)
    head = [GROUND_TRUTH] if GROUND_TRUTH in present else []
    head += [n for n in (labels or {}) if n in present and n not in head]
    return head + sorted(present - set(head))


def labels_to_json(labels: Labels) -> dict[str, dict[str, str | None]]:
    """``{source: {"display", "paper_row"}}`` for summary.json, read back by :func:`labels_from_json`."""
    return {k: dataclasses.asdict(v) for k, v in labels.items()}


def labels_from_json(doc: Mapping[str, Mapping[str, Any]] | None) -> dict[str, SourceLabel]:
    """Inverse of :func:`labels_to_json`, in the same order; None gives no labels.

    >>> labels_from_json(labels_to_json({"codetr": SourceLabel("Co-DETR", "codetr")}))
    {'codetr': SourceLabel(display='Co-DETR', paper_row='codetr')}
    """
    return {k: SourceLabel(display=str(v["display"]), paper_row=v.get("paper_row")) for k, v in (doc or {}).items()}


@dataclass
class ImageRow:
    """One test image of one fold, with one prior source (a row of ``per_image.csv``).

    ``box`` is the prior box used (x1, y1, x2, y2), ``iou`` its IoU with the ground-truth box
    (1.0 for the GT prior, NaN when absent); ``scores``/``dice`` map a method to its image score
    and per-image Dice (at that method's dice_val threshold).
    """

    id: int
    patient: str
    fold: int
    label: int
    prior_source: str
    box: tuple[float, float, float, float] | None = None
    fallback: bool = False
    iou: float = math.nan
    scores: dict[str, float] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ImageRow:
        """A row from :meth:`FoldResult.to_json`'s ``rows`` (null numbers back to NaN)."""
        box = doc.get("box")
        return cls(
            id=int(doc["id"]),
            patient=str(doc["patient"]),
            fold=int(doc["fold"]),
            label=int(doc["label"]),
            prior_source=str(doc["prior_source"]),
            box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])) if box else None,
            fallback=bool(doc.get("fallback", False)),
            iou=_float(doc.get("iou")),
            scores=_floats(doc.get("scores", {})),
            dice=_floats(doc.get("dice", {})),
        )


@dataclass
class FoldResult:
    """Everything the report needs from one fold.

    Attributes:
        fold: fold index.
        methods: ``{method: segmentation_metrics(...)}`` with the ground-truth prior; methods
            ``msgmsd``, ``dd``, ``gmsd``, ``ssim`` and ``riad`` (the multi-mask baseline).
        priors: ``{source: segmentation_metrics(...)}`` of LoRIS+MSGMSD with that source's boxes.
        detection: ``{detector: detection_metrics(...)}``.
        rows: per-image rows (any prior sources).
        fallbacks: test images where the detector found nothing and a fallback box was used.
        controls: ``{prior_source: {control: segmentation_metrics(...)}}`` of the prior-only
            controls (:mod:`evaluation.controls`) computed from that source's boxes.
    """

    fold: int
    methods: dict[str, dict[str, float]] = field(default_factory=dict)
    priors: dict[str, dict[str, float]] = field(default_factory=dict)
    detection: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: list[ImageRow] = field(default_factory=list)
    fallbacks: int = 0
    controls: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Strict-JSON content (NaN as null) that :meth:`from_json` reads back."""
        return dict(json_safe(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FoldResult:
        """The fold written by :meth:`to_json`."""
        return cls(
            fold=int(doc["fold"]),
            methods=_nested(doc.get("methods", {})),
            priors=_nested(doc.get("priors", {})),
            detection=_nested(doc.get("detection", {})),
            rows=[ImageRow.from_json(r) for r in doc.get("rows", [])],
            fallbacks=int(doc.get("fallbacks", 0)),
            controls={k: _nested(v) for k, v in doc.get("controls", {}).items()},
        )


def _float(v: Any) -> float:
    # JSON null was NaN; integers (counts such as ``fallbacks``) stay integers
    return math.nan if v is None else v if isinstance(v, int) and not isinstance(v, bool) else float(v)


def _floats(d: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): _float(v) for k, v in d.items()}


def _nested(d: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    return {str(k): _floats(v) for k, v in d.items()}


def json_safe(obj: Any) -> Any:
    """Recursively replace NaN/inf floats by None (strict JSON has no NaN) and numpy scalars by Python ones.

    >>> json_safe({"a": [float("nan"), 1.5], 2: (float("inf"),)})
    {'a': [None, 1.5], '2': [None]}
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if getattr(obj, "ndim", 0) > 0 and hasattr(obj, "tolist"):  # numpy arrays
        return json_safe(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


__all__ = [
    "GROUND_TRUTH",
    "FoldResult",
    "ImageRow",
    "Labels",
    "SourceLabel",
    "json_safe",
    "labels_from_json",
    "labels_to_json",
    "source_label",
    "source_order",
]
