"""The report renders from a small fake result set; its HTML references only files that exist."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from evaluation import Example, FoldResult, SourceLabel, select_cases, summary_from_folds, write_report
from tests.helpers import fake_row

METHODS = ("msgmsd", "dd", "gmsd", "ssim", "riad")
# what the pipeline passes from the detector registry for the built-in sources
LABELS = {
    "gt": SourceLabel("GT", "gt"),
    "yolov5": SourceLabel("YOLOv5u", "yolov5u"),
    "codetr": SourceLabel("Co-DETR", "codetr"),
}


def _strict_json(text: str) -> object:
    def reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def _folds(n_folds: int = 3) -> list[FoldResult]:
    rng = np.random.default_rng(0)
    folds = []
    for k in range(n_folds):

        def seg() -> dict[str, float]:
            return {
                "i_auroc": rng.uniform(0.6, 0.9),
                "p_auroc": rng.uniform(0.7, 0.95),
                "dice_oracle": rng.uniform(0.1, 0.4),
                "dice_val": rng.uniform(0.1, 0.3),
                "dice_per_image": rng.uniform(0.1, 0.3),
            }

        rows = []
        for i in range(8):
            label = int(i % 2)
            for prior in ("gt", "codetr"):
                rows.append(
                    fake_row(
                        k,
                        i,
                        prior,
                        box=(10.0, 20.0, 40.0, 30.0),
                        iou=1.0 if prior == "gt" else 0.8,
                        scores={m: float(rng.random() + 0.3 * label) for m in METHODS},
                        dice={m: float(rng.random()) if label else float("nan") for m in METHODS},
                    )
                )
        folds.append(
            FoldResult(
                fold=k,
                methods={m: seg() for m in METHODS},
                priors={"codetr": seg()},
                detection={"codetr": {"precision": 1.0, "map50": rng.uniform(0.8, 0.95), "map75": 0.4}},
                rows=rows,
                fallbacks=k % 2,
            )
        )
    return folds


def _examples() -> list[Example]:
    rng = np.random.default_rng(1)
    out = []
    for ident, label, case in select_cases(
        [1, 2, 3, 4], [0, 0, 1, 1], [np.nan, np.nan, 0.3, 0.6], [0.1, 0.4, 0.5, 0.9]
    ):
        gt = np.zeros((32, 32), bool)
        if label:
            gt[10:20, 8:24] = True
        out.append(
            Example(
                ident,
                label,
                case,
                rng.random((32, 32)),
                rng.random((32, 32)),
                rng.random((32, 32)),
                gt,
                np.roll(gt, 2, axis=0),
                dice=0.5,
                score=0.2,
                method="msgmsd",
            )
        )
    return out


def test_summary_sections_follow_the_contract() -> None:
    s = summary_from_folds(_folds())
    assert set(s["reconstruction"]) == {"msgmsd", "dd", "gmsd", "ssim"}
    assert set(s["reconstruction"]["msgmsd"]) >= {"i_auroc", "p_auroc", "dice_oracle", "dice_val"}
    assert set(s["reconstruction"]["msgmsd"]["i_auroc"]) >= {"mean", "std"}
    assert s["reconstruction"]["msgmsd"]["i_auroc"]["ddof"] == 1
    assert "i_auroc" in s["riad"]
    assert s["detection"]["precision"]["mean"] == 1.0 and s["detection"]["fallbacks"] == 1
    # A detector's own count wins over the fold's first prior source (ablate with gt first).
    folds = _folds()
    for f in folds:
        f.detection["codetr"]["fallbacks"] = 2
    assert summary_from_folds(folds)["detection"]["fallbacks"] == 2 * len(folds)
    assert set(s["detection"]) >= {"precision", "map50", "map75", "fallbacks"}
    assert "codetr" in s["priors"]


def test_report_renders_and_references_only_existing_files(tmp_path: Path) -> None:
    folds = _folds()
    summary = {
        "detector": "codetr",
        "data": "phantom",
        "profile": "default",
        "folds": [0, 1, 2],
        **summary_from_folds(folds),
    }
    paths = write_report(
        tmp_path,
        summary,
        folds,
        {"epochs": 3, "lr": 1e-4},
        {"numpy": np.__version__},
        examples=_examples(),
        labels=LABELS,
    )
    for name in (
        "table1.md",
        "table2.md",
        "table1.csv",
        "table2.csv",
        "table1.json",
        "table2.json",
        "per_image.csv",
        "report.html",
        "overlays.png",
        "roc.png",
        "scores.png",
    ):
        assert (tmp_path / name).is_file(), name
        assert paths[name] == tmp_path / name
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind

    t1 = (tmp_path / "table1.md").read_text()
    for name in (
        "RIAD (ours, multi-mask baseline)",
        "LoRIS+MSGMSD",
        "LoRIS+DD",
        "LoRIS+GMSD",
        "LoRIS+SSIM",
        "Dice (oracle)",
        "Dice (val)",
        "0.783 ± 0.050",
        "| paper |",
        "not numerically comparable",
    ):
        assert name in t1, name
    t2 = (tmp_path / "table2.md").read_text()
    assert "| GT | ours |" in t2 and "| Co-DETR | ours |" in t2 and "| CoDETR | paper |" in t2
    assert "-0.7" in t2  # paper's own I-AUROC gap for Co-DETR: 0.776 - 0.783
    assert "YOLOv5u" not in t2  # only detectors present in this run
    assert "refiner" not in t2  # the config did not switch the refiner on

    for t in ("table1", "table2"):
        doc = _strict_json((tmp_path / f"{t}.json").read_text())
        assert doc["rows"]  # type: ignore[index]
        rows = list(csv.DictReader((tmp_path / f"{t}.csv").open()))
        assert rows and "i_auroc_mean" in rows[0]

    per_image = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert len(per_image) == 3 * 8 * 2
    assert {"id", "patient", "fold", "label", "prior_source", "box_x1", "iou", "score_msgmsd", "dice_dd"} <= set(
        per_image[0]
    )

    page = (tmp_path / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs
    for ref in refs:
        assert ref.startswith("data:image/png;base64,") or (tmp_path / ref).is_file(), ref
    assert page.count("data:image/png;base64,") == 3
    assert "numpy" in page and "epochs" in page and "LoRIS+MSGMSD" in page


def test_report_without_riad_detector_or_examples(tmp_path: Path) -> None:
    folds = [FoldResult(k, methods={"dd": {"i_auroc": 0.5 + 0.1 * k, "p_auroc": 0.7}}) for k in range(2)]
    write_report(tmp_path, {}, folds, {}, {}, paper=False)
    t1 = (tmp_path / "table1.md").read_text()
    assert "LoRIS+DD" in t1 and "| paper |" not in t1 and "0.550 ± 0.071" in t1
    assert not (tmp_path / "overlays.png").exists()
    for ref in re.findall(r'(?:src|href)="([^"]+)"', (tmp_path / "report.html").read_text()):
        assert ref.startswith("data:") or (tmp_path / ref).is_file()


@pytest.mark.parametrize("labels", [[0, 0], [1, 1]])
def test_select_cases_with_one_class(labels: list[int]) -> None:
    cases = select_cases([1, 2], labels, [0.1, 0.9], [0.2, 0.1])
    assert [c for _, _, c in cases] == ["best", "median", "worst"]


def test_refined_detector_rows_are_named_so(tmp_path: Path) -> None:
    folds = _folds()
    summary = {"detector": "codetr", **summary_from_folds(folds)}
    write_report(tmp_path, summary, folds, {"detector": {"refine": True}}, {}, figures=False, labels=LABELS)
    t2 = (tmp_path / "table2.md").read_text()
    assert "| Co-DETR + refiner | ours |" in t2 and "| GT | ours |" in t2 and "| CoDETR | paper |" in t2


def test_figures_keep_matplotlib_out_of_home(tmp_path: Path) -> None:
    """Without MPLCONFIGDIR, matplotlib's config and font cache go to the LoRIS cache, never HOME or TMPDIR."""
    import os
    import subprocess
    import sys

    home, tmp, cache = tmp_path / "home", tmp_path / "tmp", tmp_path / "cache"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp), LORIS_CACHE=str(cache))
    code = (
        "from runtime.env import setup_environment; setup_environment()\n"
        "import os, evaluation.figures as f, matplotlib\n"
        "assert f.score_distribution_figure({'m': ([0.1, 0.9], [0, 1])})[:4] == b'\\x89PNG'\n"
        "print(matplotlib.get_cachedir()); print(os.environ.get('MPLCONFIGDIR'))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    cache_dir, variable = out.stdout.split()
    assert Path(cache_dir) == cache / "matplotlib" == Path(variable)  # the documented cache holds it
    assert not list(home.rglob("*")) and not list(tmp.iterdir())  # nothing in HOME or TMPDIR
