"""Tables name and order prior sources only through the labels the pipeline passes from the registry."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluation import FoldResult, SourceLabel
from evaluation.intervals import clustered_summary, fold_estimates
from evaluation.report import write_report
from evaluation.results import labels_from_json, labels_to_json, source_order
from evaluation.tables import build_tables, table_markdown
from tests.helpers import fake_row

# What the pipeline passes for the built-in detectors (detectors/*: display name and paper row).
BUILT_IN = {
    "gt": SourceLabel("GT", "gt"),
    "yolov5": SourceLabel("YOLOv5u", "yolov5u"),
    "codetr": SourceLabel("Co-DETR", "codetr"),
}
METHODS = ("msgmsd", "dd", "gmsd", "ssim", "riad")
SOURCES = ("toy", "codetr", "gt", "yolov5")  # unsorted on purpose; "toy" has no label
METRICS = ("i_auroc", "p_auroc", "dice_oracle", "dice_oracle_post", "dice_val")
REP_METRICS = METRICS + ("precision", "map50", "map75")


def _folds(n: int = 3) -> list[FoldResult]:
    rng = np.random.default_rng(42)

    def seg() -> dict[str, float]:
        return {k: float(np.round(rng.uniform(0.1, 0.95), 4)) for k in METRICS}

    out = []
    for k in range(n):
        rows = []
        for i in range(10):
            label = i % 2
            for src in SOURCES:
                rows.append(
                    fake_row(
                        k,
                        i,
                        src,
                        box=(10.0, 20.0, 40.0 + i, 30.0),
                        iou=1.0 if src == "gt" else 0.7,
                        scores={m: float(np.round(rng.random() + 0.4 * label, 4)) for m in METHODS},
                        dice={m: float(np.round(rng.random(), 4)) if label else float("nan") for m in METHODS},
                    )
                )
        det = {
            d: {
                "precision": float(np.round(rng.uniform(0.8, 1), 4)),
                "map50": float(np.round(rng.uniform(0.6, 0.95), 4)),
                "map75": float(np.round(rng.uniform(0.2, 0.5), 4)),
                "fallbacks": k,
            }
            for d in ("yolov5", "codetr", "toy")
        }
        out.append(
            FoldResult(
                fold=k,
                methods={m: seg() for m in METHODS},
                priors={s: seg() for s in SOURCES},
                detection=det,
                rows=rows,
                fallbacks=k % 2,
                controls={
                    s: {c: seg() for c in ("control_height", "control_area")} for s in ("gt", "yolov5", "codetr")
                },
            )
        )
    return out


def _clustered(folds: list[FoldResult], main: str = "gt") -> dict:
    rng = np.random.default_rng(5)
    ests, reps = [], []
    for f in folds:
        e = fold_estimates(f.methods, f.priors, f.controls, main, f.detection)
        ests.append(e)
        reps.append(
            {
                f"{row}/{m}": (v + rng.normal(0, 0.03, 200)).astype(np.float32)
                for row, d in e.items()
                for m, v in d.items()
                if m in REP_METRICS
            }
        )
    return clustered_summary(ests, reps, main_source=main)


# sha256[:16] of each file as written before the labels existed (prior names hard-coded in report.py)
GOLDEN = {
    "cl_codetr/differences.csv": "bd7a9dfd4d810816",
    "cl_codetr/differences.md": "2b2dfb2d83a059b0",
    "cl_codetr/per_image.csv": "49a8c77d8cff77b4",
    "cl_codetr/report.html": "7333fc5769e78c3e",
    "cl_codetr/table1.csv": "b65845393d4f0103",
    "cl_codetr/table1.json": "9daf05f4bb0b3e77",
    "cl_codetr/table1.md": "fc72cde0bb4b5196",
    "cl_codetr/table2.csv": "699506d767053ba0",
    "cl_codetr/table2.json": "4a8d6eb8d845f0e2",
    "cl_codetr/table2.md": "8a509c4450f79673",
    "clustered/differences.csv": "7ac078313ea9c879",
    "clustered/differences.md": "2f0f9b4a38e8bb15",
    "clustered/per_image.csv": "49a8c77d8cff77b4",
    "clustered/report.html": "042104c283b10d44",
    "clustered/table1.csv": "f58cb0b4b2d44167",
    "clustered/table1.json": "6720c50b771762db",
    "clustered/table1.md": "ae0f84a0f50c5b01",
    "clustered/table2.csv": "aab852462e933505",
    "clustered/table2.json": "299de40341d1c428",
    "clustered/table2.md": "521904e9eda6cda4",
    "nopaper/per_image.csv": "49a8c77d8cff77b4",
    "nopaper/report.html": "0fd35ffa3b7a953a",
    "nopaper/table1.csv": "4fc7994c6db27d89",
    "nopaper/table1.json": "d493e5867e48996b",
    "nopaper/table1.md": "164b572d7804d37c",
    "nopaper/table2.csv": "e5538d328855b727",
    "nopaper/table2.json": "9057bb248781a352",
    "nopaper/table2.md": "145c11004033d771",
    "plain/per_image.csv": "49a8c77d8cff77b4",
    "plain/report.html": "d4d9f95f60fba6d7",
    "plain/table1.csv": "3a7687ae464271e9",
    "plain/table1.json": "d43f3a93f78107bb",
    "plain/table1.md": "8a0afdb40774e2d8",
    "plain/table2.csv": "3b34de4da47de453",
    "plain/table2.json": "1192af2210de5201",
    "plain/table2.md": "d70e906c73250a4a",
    "refined/per_image.csv": "49a8c77d8cff77b4",
    "refined/report.html": "f1c500fccdcb88e8",
    "refined/table1.csv": "3a7687ae464271e9",
    "refined/table1.json": "d43f3a93f78107bb",
    "refined/table1.md": "8a0afdb40774e2d8",
    "refined/table2.csv": "e8b29aed25a2dc8c",
    "refined/table2.json": "b9109e8681f67044",
    "refined/table2.md": "59dfaaf3441af94b",
}

TABLE2_ORDER = [
    ("GT", "ours"),
    ("GT: prior only: box area", "ours (control)"),
    ("GT: prior only: box height", "ours (control)"),
    ("GT", "paper"),
    ("YOLOv5u", "ours"),
    ("YOLOv5u: prior only: box area", "ours (control)"),
    ("YOLOv5u: prior only: box height", "ours (control)"),
    ("Yolo-V5", "paper"),
    ("Co-DETR", "ours"),
    ("Co-DETR: prior only: box area", "ours (control)"),
    ("Co-DETR: prior only: box height", "ours (control)"),
    ("CoDETR", "paper"),
    ("toy", "ours"),
]


def test_built_in_labels_render_the_tables_written_before_labels_existed(tmp_path: Path) -> None:
    folds = _folds()
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "refined": {"config": {"detector": {"refine": True}}},
        "nopaper": {"paper": False},
        "clustered": {"clustered": _clustered(folds)},
        "cl_codetr": {"clustered": _clustered(folds, "codetr")},
    }
    got = {}
    for name, kw in variants.items():
        config = kw.pop("config", {})
        out = tmp_path / name
        write_report(out, {"detector": "codetr"}, folds, config, {"numpy": "x"}, figures=False, labels=BUILT_IN, **kw)
        got.update({f"{name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in out.iterdir()})
    assert got == GOLDEN
    rows = build_tables(folds, labels=BUILT_IN)["table2"]
    assert [(r["name"], r["source"]) for r in rows] == TABLE2_ORDER
    assert "(LoRIS with Co-DETR boxes)" in (tmp_path / "cl_codetr" / "table1.md").read_text()


def test_sources_without_labels_show_their_own_names_and_no_paper_row() -> None:
    rows = build_tables(_folds())["table2"]
    assert [r["name"] for r in rows if r["source"] == "ours"] == ["gt", "codetr", "toy", "yolov5"]
    assert not [r for r in rows if r["source"] == "paper"]  # paper rows are found only through a label


def test_a_registered_detector_reaches_its_paper_row_and_order_through_its_label() -> None:
    labels = {"toy": SourceLabel("Toy-DETR", "codetr"), "yolov5": SourceLabel("Y")}
    rows = build_tables(_folds(), labels=labels)["table2"]
    names = [(r["name"], r["source"]) for r in rows if r["source"] != "ours (control)"]
    assert names == [("gt", "ours"), ("Toy-DETR", "ours"), ("CoDETR", "paper"), ("Y", "ours"), ("codetr", "ours")]
    paper = next(r for r in rows if r["source"] == "paper")
    assert paper["metrics"]["gap_i_auroc"]["mean"] == pytest.approx(-0.7)  # the paper's own 0.776 - 0.783
    text = table_markdown("table2", rows)
    assert "| Toy-DETR | ours |" in text and "| Toy-DETR: prior only" not in text  # toy has no controls here


def test_source_order_and_label_round_trip() -> None:
    assert source_order(["b", "a"], BUILT_IN) == ["a", "b"]
    assert source_order(["codetr", "x", "gt", "yolov5"], BUILT_IN) == ["gt", "yolov5", "codetr", "x"]
    assert source_order(["codetr", "yolov5"], {"codetr": BUILT_IN["codetr"]}) == ["codetr", "yolov5"]
    assert labels_from_json(labels_to_json(BUILT_IN)) == BUILT_IN
    assert list(labels_from_json(labels_to_json(BUILT_IN))) == list(BUILT_IN)


def test_fold_result_json_round_trip_restores_nan_and_tuples() -> None:
    import json

    folds = _folds(1)
    doc = json.loads(json.dumps(folds[0].to_json(), allow_nan=False))
    back = FoldResult.from_json(doc)
    assert back.rows[0].box == folds[0].rows[0].box and isinstance(back.rows[0].box, tuple)
    assert np.isnan(back.rows[0].dice["msgmsd"]) and back.rows[4].dice == folds[0].rows[4].dice
    assert back.detection["codetr"]["fallbacks"] == 0 and isinstance(back.detection["codetr"]["fallbacks"], int)
    assert back.methods == folds[0].methods and back.controls == folds[0].controls
    assert FoldResult.from_json(back.to_json()) == back
