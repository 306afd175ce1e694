"""``python -m pipeline run|ablate|compare|aggregate|train|predict|merge|bench|export`` (also installed as ``loris``).

This module only builds the parser, mounting the two command groups (:mod:`pipeline.experiment.cli`:
run, ablate, compare, aggregate, bench; :mod:`pipeline.serve.cli`: train, predict, merge, export), and
dispatches to the handler each command sets; the options they share are in :mod:`pipeline.cli_args`."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.experiment import cli as experiment_cli
from pipeline.serve import cli as serve_cli

# the order of the commands in ``loris --help``, across the two groups
ORDER = ("run", "ablate", "compare", "aggregate", "train", "predict", "merge", "bench", "export")


def build_parser() -> argparse.ArgumentParser:
    """The ``loris`` command line; detector choices come from the registry (:mod:`pipeline.registry`)."""
    parser = argparse.ArgumentParser(
        prog="loris",
        description="LoRIS: localized reconstruction-by-inpainting for knee recess distension in ultrasound",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {**experiment_cli.COMMANDS, **serve_cli.COMMANDS}
    for name in ORDER:
        commands[name](sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from runtime.env import CacheHomeError, setup_environment

    try:  # before anything imports torch, matplotlib or ultralytics: they read these variables when loaded
        setup_environment(check_cache=True, cli_defaults=True)
    except CacheHomeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        if os.environ.get("LORIS_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
