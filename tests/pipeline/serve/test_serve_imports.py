"""Serving loads no experiment or evaluation code: a bundle runs with the inference path alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("evaluation", "pipeline.experiment")


SERVING = ["pipeline.serve.bundle", "pipeline.serve.bundle_file", "pipeline.shared.calibration"]


@pytest.mark.parametrize("module", SERVING)
def test_serving_imports_no_evaluation_module(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing {module} loads {out}"


def test_a_bundle_json_without_its_detector_is_refused_naming_the_key(tmp_path: Path) -> None:
    from pipeline.serve.bundle_file import check_bundle_doc

    with pytest.raises(ValueError, match="missing entry detector"):
        check_bundle_doc({"image_size": 64}, tmp_path / "bundle.json")
    with pytest.raises(ValueError, match=r"detector is ''"):
        check_bundle_doc({"detector": "", "image_size": 64}, tmp_path / "bundle.json")
