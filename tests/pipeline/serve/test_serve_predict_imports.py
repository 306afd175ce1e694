"""Serving stands apart from the experiments (issue 27): importing ``predict`` (and the serving command
line and ``merge``) loads no experiment, benchmark or evaluation module. Checked in a fresh interpreter,
since this test process has imported everything."""

from __future__ import annotations

import subprocess
import sys

import pytest

SERVING = ("pipeline.serve.predict", "pipeline.serve.merge", "pipeline.serve.cli")


def _loaded(module: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of ``prefixes`` that a fresh ``import module`` loads."""
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith({prefixes!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return sorted(done.stdout.split())


@pytest.mark.parametrize("module", SERVING)
def test_serving_loads_no_experiment_or_bench_module(module: str) -> None:
    assert _loaded(module, ("pipeline.experiment", "pipeline.bench")) == []


def test_serving_loads_no_evaluation_module() -> None:
    assert _loaded("pipeline.serve.predict", ("evaluation",)) == []
