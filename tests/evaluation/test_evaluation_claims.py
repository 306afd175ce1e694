"""``python -m evaluation.claims``: the claims of a finished run, named through the run's labels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_evaluation_tables import BUILT_IN, _clustered, _folds

from evaluation.aggregate import json_safe, summary_from_folds
from evaluation.claims import main
from evaluation.results import labels_to_json


def _run(root: Path, toy: bool, labels: bool = True) -> Path:
    """A finished run with one external set, as the pipeline writes its summaries."""
    folds = _folds()
    if not toy:
        for f in folds:
            f.rows = [r for r in f.rows if r.prior_source != "toy"]
            f.priors.pop("toy")
            f.detection.pop("toy")
    summary = summary_from_folds(folds)
    summary["clustered"] = _clustered(folds)
    if labels:
        summary["labels"] = labels_to_json(BUILT_IN)
    (root / "ext").mkdir(parents=True)
    (root / "ext" / "summary.json").write_text(json.dumps(json_safe(summary)))
    summary["external"] = [{"data": "/data/held-a", "report": "ext"}]
    (root / "summary.json").write_text(json.dumps(json_safe(summary)))
    return root


def test_built_in_sources_print_what_they_printed_before_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(_run(tmp_path, toy=False))]) == 0
    out = capsys.readouterr().out
    # sha256[:16] of the output when the detector names were hard-coded in claims.py
    assert (hashlib.sha256(out.encode()).hexdigest()[:16], len(out.splitlines())) == ("e9b825cb07d7b28e", 87)
    assert "| Co-DETR priors close to GT: ΔI-AUROC | +37.7 [" in out
    assert "| CV (5 folds) | held-out held-a |" in out.splitlines()[0]


def test_a_new_source_gets_its_claims_and_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(_run(tmp_path, toy=True, labels=False))]) == 0
    out = capsys.readouterr().out
    for line in ("| toy priors close to GT: ΔDice (val) |", "| toy/detection | map75 |", "| yolov5 priors close"):
        assert line in out, line
    lines = out.splitlines()
    order = [i for src in ("codetr", "toy", "yolov5") for i, x in enumerate(lines) if x.startswith(f"| {src}/msgmsd")]
    assert order == sorted(order)  # unlabelled sources: sorted


@pytest.mark.parametrize("args", [[], ["a", "b"]])
def test_usage(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2 and "usage" in capsys.readouterr().err


def test_missing_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2 and "summary.json not found" in capsys.readouterr().err
