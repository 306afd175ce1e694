"""Configuration: defaults, profile, user file and ``--set`` overrides, merged highest last.

>>> cfg = load_config(profile="quick", overrides=["unet.epochs=2", "detector.name=yolov5"])
>>> cfg["unet"]["epochs"], cfg["detector"]["name"], cfg["profile"]
(2, 'yolov5', 'quick')
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PROFILES = ("quick", "default", "paper")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names it and the key."""


def _merge(base: dict[str, Any], update: dict[str, Any], where: str, strict: bool = True) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if strict and key not in out:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(out))})")
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            # an empty mapping in the defaults is free-form (e.g. detector.options)
            out[key] = _merge(out[key], value, f"{where}.{key}", strict and bool(out[key]))
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
    """``a.b=value`` -> ``{"a": {"b": value}}``; the value is parsed as YAML (numbers, lists, null)."""
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


def load_config(
    config_file: Path | str | None = None, profile: str = "default", overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """Defaults < profile < ``config_file`` < ``overrides``; unknown keys are errors."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; choose from {', '.join(PROFILES)}")
    cfg = _read_yaml(CONFIG_DIR / "default.yaml")
    cfg = _merge(cfg, _read_yaml(CONFIG_DIR / "profiles" / f"{profile}.yaml"), f"profiles/{profile}.yaml")
    if config_file is not None:
        cfg = _merge(cfg, _read_yaml(Path(config_file)), str(config_file))
    for text in overrides:
        cfg = _merge(cfg, parse_override(text), f"--set {text}")
    cfg["profile"] = profile
    return cfg


def detector_config_path(cfg: dict[str, Any]) -> Path | None:
    """The detector's own config file: explicit, else configs/detectors/<name>[_paper|_quick].(yaml|py) by
    profile, else configs/detectors/<name>.(yaml|py), else None."""
    det = cfg["detector"]
    if det["name"] == "gt":
        return None
    if det.get("config"):
        return Path(det["config"])
    suffix = {"paper": "_paper", "quick": "_quick"}.get(cfg["profile"], "")
    for name in (f"{det['name']}{suffix}", det["name"]):  # a profile without its own file uses the base one
        for ext in (".yaml", ".py"):
            path = CONFIG_DIR / "detectors" / f"{name}{ext}"
            if path.is_file():
                return path
    return None  # a registered detector without a config file runs on its own defaults


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
