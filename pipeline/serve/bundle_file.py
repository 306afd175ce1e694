"""``bundle.json``, typed: :class:`BundleDoc`, its one reader (:func:`read_bundle_doc`), its one writer
(:func:`write_bundle_doc`), the check of its values (:func:`check_bundle_doc`) and :func:`bundle_digest`
(what ``predict.json`` records of the bundle a run used).

``format`` is the file's version; every other key is a field of :class:`BundleDoc` or of its three
sections (:class:`ScoreSpec`, :class:`SegmentationSpec`, :class:`PriorSpec`), in the file's order, so
``json.dumps(BundleDoc.from_dict(d).to_dict())`` gives back the bytes ``train`` wrote. An optional
entry the file lacks is None and left out again by :meth:`BundleDoc.to_dict`.

>>> doc = {"format": 1, "detector": "yolov5", "image_size": 64, "maps": ["dd"], "frame": 0, "mask_margin": 0.0,
...        "score": {"map": "dd", "threshold": 0.2, "pooling": "mean", "region": "box", "topk_fraction": 0.01,
...                  "inset": 0.0}, "segmentation": {"map": "dd", "threshold": 0.1, "kernel": 3},
...        "prior": {"threshold": 0.05, "median_box": [8, 16, 56, 32], "expand_up": 0.0, "expand_side": 0.0}}
>>> typed = BundleDoc.from_dict(doc)
>>> typed.score.threshold, typed.prior.median_box, typed.to_dict() == doc
(0.2, (8, 16, 56, 32), True)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pipeline.config import IMAGE_SIZE, known_maps
from pipeline.shared.calibration import CALIBRATION_METHODS
from runtime.io import load_meta

BUNDLE_FORMAT = 1
Pooling = Literal["mean", "max", "topk"]
Region = Literal["image", "box"]
_TYPED = {"detector", "maps", "score", "segmentation", "prior", "warnings", "source"}  # read by BundleDoc.from_dict


def _as_dict(obj: Any) -> dict[str, Any]:
    """A section's JSON object: its fields in order, None (an entry the file lacked) left out."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None or not f.compare:
            continue
        if is_dataclass(value):
            value = _as_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


def _present(cls: Any, d: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of the section ``cls`` (absent ones take its defaults)."""
    return {f.name: d[f.name] for f in fields(cls) if f.name in d}


@dataclass(frozen=True, kw_only=True)
class ScoreSpec:
    """``score``: the image score, its verdict threshold and the validation figures at that threshold."""

    map: str
    threshold: float
    operating_point: str | None = None  # youden or sensitivity
    pooling: Pooling
    region: Region
    topk_fraction: float
    inset: float = 0.0  # bundles made before the inset pool the whole box
    validation: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScoreSpec:
        return cls(**_present(cls, d))


@dataclass(frozen=True, kw_only=True)
class SegmentationSpec:
    """``segmentation``: the map segmented, its pixel threshold and the post-processing kernel."""

    map: str
    threshold: float
    validation_dice: float | None = None
    kernel: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegmentationSpec:
        return cls(**_present(cls, d))


@dataclass(frozen=True, kw_only=True)
class PriorSpec:
    """``prior``: the detector's confidence threshold, the fallback box and the box expansion."""

    threshold: float
    median_box: tuple[float, float, float, float]
    expand_up: float
    expand_side: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PriorSpec:
        x1, y1, x2, y2 = d["median_box"]
        return cls(
            threshold=d["threshold"],
            median_box=(x1, y1, x2, y2),
            expand_up=d["expand_up"],
            expand_side=d["expand_side"],
        )


@dataclass(frozen=True, kw_only=True)
class BundleDoc:
    """A bundle's ``bundle.json``: what inference needs, then ``train``'s record and provenance."""

    format: int = BUNDLE_FORMAT
    detector: str
    image_size: int
    maps: tuple[str, ...]
    frame: int = 0
    mask_margin: float = 0.0
    score: ScoreSpec
    calibration: Mapping[str, Any] | None = None  # fit_calibration's; None in a bundle made before it
    segmentation: SegmentationSpec
    prior: PriorSpec
    warnings: tuple[str, ...] | None = None  # why the bundle is unfit for use ([] when fit)
    train: Mapping[str, Any] | None = None
    config: Mapping[str, Any] | None = None
    versions: Mapping[str, Any] | None = None
    commit: str | None = None
    # the object it was read from: a bundle's model_version hashes the file's own keys
    source: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BundleDoc:
        """The typed form of a ``bundle.json`` object (its unknown keys ignored)."""
        plain = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in _TYPED}
        warnings = d.get("warnings")
        return cls(
            **plain,
            detector=str(d.get("detector")),  # check_bundle_doc refuses a missing one
            maps=tuple(d["maps"]),
            score=ScoreSpec.from_dict(d["score"]),
            segmentation=SegmentationSpec.from_dict(d["segmentation"]),
            prior=PriorSpec.from_dict(d["prior"]),
            warnings=None if warnings is None else tuple(warnings),
            source=d,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in ``train``'s order."""
        return _as_dict(self)


def _finite(value: Any) -> bool:
    """A JSON number (not a boolean) that is finite as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


class _Fields:
    """Dotted keys of one ``bundle.json`` object, each read and checked with an error naming file and key."""

    def __init__(self, doc: Mapping[str, Any], path: Path | str, hint: str) -> None:
        self.doc, self.path, self.tail = doc, path, f"; {hint}" if hint else ""

    def bad(self, key: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{self.path}: {key} is {value!r}; expected {expected}{self.tail}")

    def get(self, key: str, default: Any = ...) -> Any:
        node: Any = self.doc
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not ...:
                    return default
                raise ValueError(f"{self.path}: missing entry {key}{self.tail}")
            node = node[part]
        return node

    def number(self, key: str, low: float | None = None, high: float | None = None, default: Any = ...) -> None:
        value = self.get(key, default)
        ok = _finite(value) and (low is None or value >= low) and (high is None or value <= high)
        if not ok:
            span = f" in [{low:g}, {high:g}]" if low is not None and high is not None else ""
            span = span or (f" >= {low:g}" if low is not None else "")
            raise self.bad(key, value, f"a finite number{span}")

    def integer(self, key: str, low: int, high: int | None = None, default: Any = ...) -> None:
        value = self.get(key, default)
        if not (isinstance(value, int) and not isinstance(value, bool)) or value < low or (high and value > high):
            raise self.bad(key, value, f"an int in [{low}, {high}]" if high else f"an int >= {low}")

    def choice(self, key: str, options: tuple[str, ...], default: Any = ...) -> None:
        value = self.get(key, default)
        if value not in options:
            raise self.bad(key, value, f"one of {', '.join(options)}")


def _check_maps(f: _Fields) -> list[Any]:
    """``maps``: distinct known anomaly maps; returns them."""
    known = known_maps()
    maps = f.get("maps")
    if not isinstance(maps, list) or not maps or len(set(map(str, maps))) != len(maps):
        raise f.bad("maps", maps, f"a list of distinct anomaly maps from {', '.join(known)}")
    for name in maps:
        if name not in known:
            raise f.bad("maps", name, f"an anomaly map from {', '.join(known)}")
    return maps


def _check_score(f: _Fields, maps: list[Any]) -> None:
    """``score`` and ``segmentation``: maps among the bundle's, finite thresholds, known pooling."""
    for section in ("score", "segmentation"):
        if f.get(f"{section}.map") not in maps:
            raise f.bad(f"{section}.map", f.get(f"{section}.map"), f"one of the bundle's maps ({', '.join(maps)})")
        f.number(f"{section}.threshold")
    f.choice("score.pooling", get_args(Pooling))
    f.choice("score.region", get_args(Region))
    f.number("score.topk_fraction", 0.0, 1.0)
    f.number("score.inset", 0.0, 0.25, default=0.0)
    f.integer("segmentation.kernel", 1)


def _check_prior(f: _Fields) -> None:
    """``prior``: a confidence threshold in [0, 1], a four-number box and non-negative expansions."""
    f.number("prior.threshold", 0.0, 1.0)
    box = f.get("prior.median_box")
    if not isinstance(box, list) or len(box) != 4 or not all(_finite(v) for v in box):
        raise f.bad("prior.median_box", box, "four finite numbers [x1, y1, x2, y2]")
    f.number("prior.expand_up", 0.0)
    f.number("prior.expand_side", 0.0)


def _check_calibration(f: _Fields) -> None:
    """``calibration`` (optional): a known method; Platt's ``a`` >= 0 and ``b`` finite."""
    if "calibration" not in f.doc:
        return
    cal = f.doc["calibration"]
    if not isinstance(cal, dict):
        raise f.bad("calibration", cal, "an object with a method")
    f.choice("calibration.method", CALIBRATION_METHODS)
    if cal["method"] == "platt":
        f.number("calibration.a", 0.0)
        f.number("calibration.b")


def check_bundle_doc(doc: Mapping[str, Any], path: Path | str, hint: str = "") -> None:
    """Refuse a ``bundle.json`` whose values cannot work (a tampered or damaged file), naming the file,
    the key and the value: non-finite thresholds, an ``image_size`` outside the config's range, unknown
    or repeated anomaly maps, unknown pooling or region, a bad prior box, a ``calibration`` (optional:
    bundles made before it have none) of an unknown method or, for Platt scaling, with a non-finite
    ``b`` or an ``a`` that is negative (a probability falling as the score rises) or not finite.

    >>> check_bundle_doc({"detector": "gt", "image_size": -5}, "m/bundle.json")
    Traceback (most recent call last):
    ...
    ValueError: m/bundle.json: image_size is -5; expected an int in [16, 2048]
    """
    f = _Fields(doc, path, hint)
    detector = f.get("detector")
    if not isinstance(detector, str) or not detector:  # the name loads the detector and names the model
        raise f.bad("detector", detector, "a detector's registered name")
    f.integer("image_size", *IMAGE_SIZE)
    f.integer("frame", 0, default=0)
    f.number("mask_margin", 0.0, default=0.0)
    _check_score(f, _check_maps(f))
    _check_prior(f)
    _check_calibration(f)


def read_bundle_doc(directory: Path, hint: str = "", checked: bool = True) -> BundleDoc:
    """``directory/bundle.json``, its format and (``checked``) its values checked before anything loads.

    A missing file is a FileNotFoundError; a damaged one, another format or a bad value a ValueError
    (:class:`runtime.io.CheckpointError` for unreadable JSON) naming the file and ending with ``hint``.
    """
    directory = Path(directory)
    path = directory / "bundle.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a LoRIS bundle (no bundle.json); create one with `train`")
    doc = load_meta(path, hint=hint)
    if checked:
        if doc.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{path}: bundle format {doc.get('format')} is not supported (expected {BUNDLE_FORMAT})")
        check_bundle_doc(doc, path, hint)
    try:
        return BundleDoc.from_dict(doc)
    except (KeyError, TypeError, ValueError) as exc:
        tail = f"; {hint}" if hint else ""
        raise ValueError(f"{path}: missing or malformed entry ({exc.__class__.__name__}: {exc}){tail}") from None


def write_bundle_doc(directory: Path, doc: BundleDoc) -> None:
    """Write ``directory/bundle.json`` atomically (one-space indent, numpy values as plain numbers)."""
    from pipeline.run_dirs import write_json

    write_json(Path(directory) / "bundle.json", doc.to_dict())


def bundle_digest(directory: Path) -> str:
    """SHA-256 of a bundle's files (relative path and contents): ``bundle.json``, ``detector/`` and
    ``unet/`` when it has a ``bundle.json`` (its training scratch ``work/`` is left out), else every file.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp()); _ = (root / "bundle.json").write_text("{}")
    >>> d = bundle_digest(root); _ = (root / "bundle.json").write_text("{ }")
    >>> len(d), d == bundle_digest(root)
    (64, False)
    """
    directory = Path(directory)
    if (directory / "bundle.json").is_file():
        parts = [directory / "bundle.json"]
        parts += [p for d in ("detector", "unet") for p in (directory / d).rglob("*")]
    else:
        parts = list(directory.rglob("*"))
    h = hashlib.sha256()
    for p in sorted(q for q in parts if q.is_file()):
        with open(p, "rb") as fh:
            h.update(p.relative_to(directory).as_posix().encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()
