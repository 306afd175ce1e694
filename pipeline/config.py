"""Configuration: defaults, profile, user file and ``--set`` overrides, merged highest last, then parsed
once into frozen dataclasses whose types and ranges are checked at load.

``configs/default.yaml`` is the one defaults file (every key, commented); a section here is a
dataclass with one field per key of that file. ``detector.options`` and ``detector.refiner`` are
free mappings handed to the detector and the box refiner.

>>> cfg = load_config(profile="quick", overrides=["unet.epochs=2", "detector.name=yolov5"])
>>> cfg.unet.epochs, cfg.detector.name, cfg.profile
(2, 'yolov5', 'quick')
>>> load_config(overrides=["score.pooling=median"])
Traceback (most recent call last):
...
pipeline.config.ConfigError: score.pooling: must be one of mean|max|topk, got 'median'
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml

# configs/ of the checkout, or of the installed wheel (pyproject.toml maps it to this package name)
CONFIG_DIR = Path(str(resources.files("loris_configs")))
PROFILES = ("quick", "default", "faithful", "paper")  # the Literal of Config.profile
INT_MAX = 2**63 - 1  # what torch and numpy take as an integer setting
SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes at most 32 bits
IMAGE_SIZE = (16, 2048)  # model size in pixels: the U-Net's depth needs 16; above 2048 nothing fits in memory


class ConfigError(ValueError):
    """A config file or override is invalid; the message names it and the key."""


class Range(NamedTuple):
    """The allowed range of a number field: ``Annotated[int, Range(1)]`` (string choices are ``Literal``)."""

    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class PhantomConfig:
    """``phantom``: the embedded phantom's composition (used when ``data`` is null)."""

    images: Annotated[int, Range(1)]
    distended: Annotated[int, Range(0)]
    patients: Annotated[int, Range(1)]
    size: Annotated[int, Range(8)]
    appearance: Literal["anechoic", "echogenic", "mixed"]


@dataclass(frozen=True)
class DetectorConfig:
    """``detector``: the location prior (``name`` must be registered, see :mod:`detectors.base`)."""

    name: str
    config: str | None
    train_classes: Literal["normal", "all"]
    threshold: Annotated[float, Range(0.0, 1.0)]
    expand_up: Annotated[float, Range(0.0)]
    expand_side: Annotated[float, Range(0.0)]
    options: Mapping[str, Any]
    refine: bool
    refiner: Mapping[str, Any]


LOSS_WEIGHT_ORDER = ("msgms", "ssim", "l2")  # the terms of unet.loss_weights, in the YAML list's order


@dataclass(frozen=True)
class UNetSettings:
    """``unet``: the LoRIS U-Net and its training budget (``epochs``, opt-in ``max_minutes``)."""

    profile: str
    epochs: Annotated[int, Range(1)]
    patience: Annotated[int, Range(1)]
    lr: Annotated[float, Range(0.0)]
    batch_size: Annotated[int, Range(1)]
    mask_margin: Annotated[float, Range(0.0)]
    loss_weights: tuple[float, float, float]  # by LOSS_WEIGHT_ORDER
    box_weight: Annotated[float, Range(0.0)]
    max_minutes: Annotated[float, Range(0.0)]


@dataclass(frozen=True)
class RiadConfig:
    """``riad``: the RIAD baseline (same U-Net, random grid masks) and its training budget."""

    enabled: bool
    epochs: Annotated[int, Range(1)]
    patience: Annotated[int, Range(1)]
    ks: tuple[int, ...]
    max_minutes: Annotated[float, Range(0.0)]


@dataclass(frozen=True)
class ScoreConfig:
    """``score``: how an anomaly map becomes an image score."""

    pooling: Literal["mean", "max", "topk"]
    region: Literal["image", "box"]
    topk_fraction: Annotated[float, Range(0.0, 1.0)]
    inset: Annotated[float, Range(0.0, 0.25)]


@dataclass(frozen=True)
class EvaluationConfig:
    """``evaluation``: post-processing, P-AUROC streaming, figures and held-out sets."""

    postprocess_kernel: Annotated[int, Range(1)]
    exact_pauroc_max_pixels: Annotated[int, Range(1)]
    figures: bool
    external: str | tuple[str, ...] | None

    @property
    def external_paths(self) -> list[str]:
        """The held-out sets: none, one folder or several."""
        value = self.external
        paths = [value] if isinstance(value, str) else list(value or ())
        if any(not p for p in paths):
            raise ConfigError(f"evaluation.external must be a folder or a list of folders, got {value!r}")
        return paths


@dataclass(frozen=True)
class BundleConfig:
    """``bundle``: the deployable model's operating point and maps."""

    operating_point: Literal["youden", "sensitivity"]
    sensitivity: Annotated[float, Range(0.0, 1.0)]
    score_map: str
    segment_map: str


@dataclass(frozen=True)
class Config:
    """The resolved configuration of one command; ``to_dict()`` is what runs save as ``config.yaml``."""

    data: str | None
    image_size: Annotated[int, Range(*IMAGE_SIZE)]
    frame: Annotated[int, Range(0)]
    folds: Annotated[int, Range(2)]
    seed: Annotated[int, Range(0, SEED_MAX)]
    device: str
    threads: Annotated[int, Range(0)]
    cache_dir: str | None
    out_root: str
    run_folds: tuple[int, ...] | None
    phantom: PhantomConfig
    detector: DetectorConfig
    unet: UNetSettings
    riad: RiadConfig
    maps: tuple[str, ...]
    score: ScoreConfig
    evaluation: EvaluationConfig
    bundle: BundleConfig
    profile: Literal["quick", "default", "faithful", "paper"]
    progress: bool = True  # display only: set by the CLI, not a config key

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON types (tuples as lists), in ``configs/default.yaml``'s key order."""
        return typing.cast(dict[str, Any], _plain(dataclasses.asdict(self)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- parsing and checks


def _describe(tp: Any, rng: Range) -> str:
    """``an int >= 1``, ``a number in [0, 1]``, ``true or false``, ... for error messages."""
    low, high = (None if v is None else int(v) if tp is int else v for v in rng)
    name = {int: "an int", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
    if low is not None and high is not None:
        return f"{name} in [{low:g}, {high:g}]" if tp is float else f"{name} in [{low}, {high}]"
    if low is not None:
        return f"{name} >= {low:g}" if tp is float else f"{name} >= {low}"
    return name


def _scalar(tp: type, value: Any, key: str, rng: Range) -> Any:
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    low, high = rng
    if ok and tp is float:  # NaN passes every comparison and inf means nothing: finite numbers only
        try:
            finite = math.isfinite(float(value))
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise ConfigError(
                f"{key}: expected {_describe(tp, rng).replace('a number', 'a finite number')}, got {value!r}"
            )
    if ok and tp is int and high is None and value > INT_MAX:
        raise ConfigError(f"{key}: {value} is too large (at most {INT_MAX})")
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}: expected {_describe(tp, rng)}, got {value!r}")
    return float(value) if tp is float else value


def _sequence(args: tuple[Any, ...], value: Any, key: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if args[-1] is Ellipsis:
        return tuple(_value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
    return tuple(_value(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(args, value)))


def _union(args: tuple[Any, ...], value: Any, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:
        return _value(members[0], value, key)
    errors = []
    for tp in members:
        try:
            return _value(tp, value, key)
        except ConfigError as exc:
            errors.append(str(exc).split(": ", 1)[1])
    null = " or null" if type(None) in args else ""
    raise ConfigError(f"{key}: {' or '.join(errors)}{null}")


def _value(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with its :class:`Range`, if any); return it typed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _scalar(args[0], value, key, next((a for a in args[1:] if isinstance(a, Range)), Range()))
    if dataclasses.is_dataclass(tp):
        return _section(typing.cast(type, tp), value, key)
    if origin in (typing.Union, types.UnionType):
        return _union(args, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {'|'.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        return _sequence(args, value, key)
    if origin is Mapping:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
        return copy.deepcopy(value)
    return _scalar(tp, value, key, Range())


def _section(cls: type, raw: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from the mapping ``raw`` (every key of the merged defaults is present)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(raw) - known)
    if extra:
        raise ConfigError(f"{where}: unknown key '{extra[0]}' (known: {', '.join(sorted(known))})")
    prefix = f"{where}." if where else ""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _value(hints[f.name], raw[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}: missing (see configs/default.yaml)")
    return cls(**values)


def parse_config(doc: Mapping[str, Any]) -> Config:
    """The typed :class:`Config` of a resolved (merged) mapping; the detector must be registered."""
    from detectors.base import registered

    cfg: Config = _section(Config, dict(doc), "")
    names = sorted(registered())
    if cfg.detector.name not in names:
        raise ConfigError(f"detector.name: must be one of {'|'.join(names)}, got {cfg.detector.name!r}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device: must be one of auto|cpu|cuda (or cuda:N), got {cfg.device!r}")
    if cfg.phantom.distended > cfg.phantom.images:
        raise ConfigError(f"phantom.distended: expected at most phantom.images ({cfg.phantom.images})")
    _check_meaning(cfg)
    return cfg


def known_maps() -> tuple[str, ...]:
    """The anomaly maps a config may name: :data:`reconstruction.deviation.MAP_NAMES` and any map
    registered since (:func:`reconstruction.deviation.register_map`)."""
    from reconstruction import deviation

    return tuple(dict.fromkeys([*deviation.MAP_NAMES, *deviation._MAPS]))


def _check_maps(key: str, names: Iterable[str]) -> None:
    known = known_maps()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{key}: unknown anomaly map {name!r}; {hint}known: {', '.join(known)}")


def _check_phantom(ph: PhantomConfig) -> None:
    """What :func:`scans.phantom.generate_dataset` can render, refused before it starts."""
    from scans.phantom import MIN_PATIENTS, SIZE_RANGE

    low, high = SIZE_RANGE
    if not low <= ph.size <= high:
        raise ConfigError(f"phantom.size: expected an int in [{low}, {high}], got {ph.size}")
    if not MIN_PATIENTS <= ph.patients <= ph.images:
        raise ConfigError(
            f"phantom.patients: expected an int in [{MIN_PATIENTS}, phantom.images ({ph.images})] (the phantom's "
            f"5 patient-grouped folds with a validation part need {MIN_PATIENTS}), got {ph.patients}"
        )


def _check_meaning(cfg: Config) -> None:
    """Values of the right type that still mean nothing: refused here, before anything loads or trains."""
    if not cfg.maps:
        raise ConfigError(f"maps: name at least one anomaly map (known: {', '.join(known_maps())})")
    _check_maps("maps", cfg.maps)
    twice = sorted({m for m in cfg.maps if cfg.maps.count(m) > 1})
    if twice:
        raise ConfigError(f"maps: {twice[0]!r} is listed more than once in {list(cfg.maps)}")
    _check_maps("bundle.score_map", [cfg.bundle.score_map])
    _check_maps("bundle.segment_map", [cfg.bundle.segment_map])
    if not cfg.riad.ks:
        raise ConfigError("riad.ks: name at least one grid cell size (e.g. [2, 4, 8, 16])")
    bad = [k for k in cfg.riad.ks if k < 1]
    if bad:
        raise ConfigError(f"riad.ks: grid cell sizes must be 1 or more, got {bad[0]} in {list(cfg.riad.ks)}")
    weights = cfg.unet.loss_weights
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"unet.loss_weights: the MSGMS, SSIM and L2 weights must be >= 0 with a positive sum, got {list(weights)}"
        )
    _check_phantom(cfg.phantom)
    cores = os.cpu_count()
    if cores and cfg.threads > cores:
        print(
            f"warning: threads={cfg.threads} is more than this machine's {cores} CPU core(s): torch will "
            f"oversubscribe them and run slower (threads=0 uses every core; the numbers depend on the count)",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------- merging


def _merge(
    base: dict[str, Any], update: Mapping[str, Any], where: str, strict: bool = True, prefix: str = ""
) -> dict[str, Any]:
    """``update`` over ``base``; ``where`` names the source (a file, ``--set ...``) and ``prefix`` the
    dotted key of this level, so an unknown key is named in full once, with the closest known one."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if strict and key not in out:
            dotted, known = f"{prefix}{key}", [f"{prefix}{k}" for k in sorted(out)]
            close = difflib.get_close_matches(dotted, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"{where}: unknown key '{dotted}'{hint}")
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            # an empty mapping in the defaults is free-form (e.g. detector.options)
            out[key] = _merge(out[key], value, where, strict and bool(out[key]), f"{prefix}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys")
    return doc


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> ``{"a": {"b": value}}``; the value is parsed as YAML (numbers, lists, null).

    >>> parse_override("unet.epochs=5")
    {'unet': {'epochs': 5}}
    """
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def resolve(
    config_file: Path | str | None = None,
    profile: str = "default",
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The merged mapping: defaults < profile < ``config_file`` < ``overrides`` < ``flags`` (the CLI's
    own options, e.g. ``--data``); unknown keys are errors."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; choose from {', '.join(PROFILES)}")
    doc = _read_yaml(CONFIG_DIR / "default.yaml")
    doc = _merge(doc, _read_yaml(CONFIG_DIR / "profiles" / f"{profile}.yaml"), f"profiles/{profile}.yaml")
    if config_file is not None:
        doc = _merge(doc, _read_yaml(Path(config_file)), str(config_file))
    for text in overrides:
        doc = _merge(doc, parse_override(text), f"--set {text}")
    if flags:
        doc = _merge(doc, flags, "command line")
    doc["profile"] = profile
    return doc


def load_config(
    config_file: Path | str | None = None,
    profile: str = "default",
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < profile < ``config_file`` < ``overrides`` < ``flags``, checked and typed (:class:`Config`)."""
    return parse_config(resolve(config_file, profile, overrides, flags))


def detector_config_path(name: str, explicit: str | None, profile: str) -> Path | None:
    """The detector's own config file: ``explicit``, else configs/detectors/<name>[_paper|_quick].(yaml|py)
    by profile, else configs/detectors/<name>.(yaml|py), else None (the detector's own defaults).

    >>> detector_config_path("yolov5", None, "quick").name
    'yolov5_quick.yaml'
    """
    if explicit:
        return Path(explicit)
    suffix = {"paper": "_paper", "quick": "_quick"}.get(profile, "")
    for stem in (f"{name}{suffix}", name):  # a profile without its own file uses the base one
        for ext in (".yaml", ".py"):
            path = CONFIG_DIR / "detectors" / f"{stem}{ext}"
            if path.is_file():
                return path
    return None


def dump(doc: Mapping[str, Any]) -> str:
    """YAML text of a config mapping (``Config.to_dict()``), keys in their given order."""
    return yaml.safe_dump(dict(doc), sort_keys=False)
