"""Negative control: on a phantom whose "distended" scans carry no pocket, nothing may detect them.

The same generator with severity 0 and the labels kept (``python -m scans phantom --null``): LoRIS
and the prior-only controls must then score at chance, and the patient-clustered interval of each
I-AUROC must say so by containing 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.__main__ import main

pytestmark = pytest.mark.integration  # end to end across packages (issue 27: tests/integration/)


@pytest.mark.slow
def test_null_phantom_scores_at_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))
    from scans.__main__ import main as scans_main

    data = tmp_path / "null"
    # the default phantom's composition (483 images, 123 "distended", 60 patients) at 128 px, seed 0
    assert scans_main(["phantom", "--null", "--out", str(data), "--size", "128", "--seed", "0"]) == 0
    out = tmp_path / "run"
    sets = ["run_folds=null", f"cache_dir={tmp_path / 'models'}", "riad.enabled=false", "evaluation.figures=false"]
    args = ["run", "--detector", "gt", "--profile", "quick", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["clustered"]["rows"]
    for row in ("gt/msgmsd", "gt/dd", "gt/control_height", "gt/control_area"):
        iv = rows[row]["i_auroc"]["pooled"]
        assert iv["low"] <= 0.5 <= iv["high"], (row, iv)
