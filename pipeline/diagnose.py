"""Kept for ``python -m pipeline.diagnose``: the diagnosis lives in :mod:`pipeline.experiment.diagnose`."""

from __future__ import annotations

from collections.abc import Sequence

from runtime.env import setup_environment


def main(argv: Sequence[str] | None = None) -> int:
    """:func:`pipeline.experiment.diagnose.main`, with the environment set before torch is imported."""
    setup_environment()
    from pipeline.experiment.diagnose import main as diagnose

    return diagnose(argv)


if __name__ == "__main__":
    raise SystemExit(main())
