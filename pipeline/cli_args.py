"""What the ``loris`` command groups share (:mod:`pipeline.experiment.cli`, :mod:`pipeline.serve.cli`):
the config options (``--data``, ``--config``, ``--profile``, ``--set``, ``--no-progress``), the typed config
they give, and argparse types for numbers and fold lists."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Config


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The config options of every command that loads a config."""
    from pipeline.config import PROFILES

    p.add_argument("--data", type=Path, help="dataset folder (README 'Your own data'); default: the embedded phantom")
    p.add_argument("--config", type=Path, help="YAML file overriding configs/default.yaml")
    p.add_argument("--profile", choices=PROFILES, default="default")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (dotted, e.g. unet.epochs=5); repeatable, applied last",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace, detector: str) -> Config:
    """The typed config: files and ``--set``, then the command's own options (``--data``, ``--external``, ...)."""
    from pipeline.config import load_config

    flags: dict[str, Any] = {}
    if args.data is not None:
        flags["data"] = str(args.data)
    if getattr(args, "external", None):
        paths = [str(p) for p in args.external]
        flags["evaluation"] = {"external": paths[0] if len(paths) == 1 else paths}
    if getattr(args, "folds", None):
        flags["run_folds"] = [int(v) for v in args.folds.split(",")]
    if getattr(args, "sensitivity", None) is not None:
        flags["bundle"] = {"operating_point": "sensitivity", "sensitivity": args.sensitivity}
    cfg = load_config(args.config, args.profile, [f"detector.name={detector}", *args.overrides], flags)
    return replace(cfg, progress=not args.no_progress)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def unit_fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], not {text}")
    return value


def fold_list(text: str) -> str:
    """An argparse type: comma-separated fold indices (0 or more), kept as text for the config."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers such as 0,2, not {text!r}")
    return ",".join(parts)
