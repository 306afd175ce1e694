"""Serving loads no experiment or evaluation code: a bundle runs with the inference path alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN = ("evaluation", "pipeline.experiment")


SERVING = ["pipeline.serve.bundle", "pipeline.serve.bundle_file", "pipeline.shared.calibration"]


@pytest.mark.parametrize("module", SERVING)
def test_serving_imports_no_evaluation_module(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing {module} loads {out}"
