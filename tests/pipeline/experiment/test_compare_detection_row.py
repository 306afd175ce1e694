"""``compare``'s Table 1 has no "LoRIS+DETECTION" row: a detector's detection metrics sit under its name
(``<source>/detection``) beside LoRIS's maps, but they are no LoRIS map (commit f7daea5)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from evaluation.controls import CONTROL_NAMES
from evaluation.intervals import fold_estimates
from evaluation.tables import METHOD_NAMES
from pipeline.experiment.compare_report import ScoredSet, table_rows

MAIN = "yolov5"  # LoRIS's prior source: the detector whose boxes it inpaints


def _fold(i: int) -> dict[str, Mapping[str, float]]:
    """One fold's rows as ``run`` makes them: two LoRIS maps and a prior-only control under the detector, and
    the detector's own detection metrics under the same name."""
    auroc = {"i_auroc": 0.7 + 0.01 * i, "p_auroc": 0.8}
    return fold_estimates(
        methods={"msgmsd": auroc, "dd": {"i_auroc": 0.6 + 0.01 * i}},
        priors={},
        controls={MAIN: {"control_area": {"i_auroc": 0.55}}},
        main_source=MAIN,
        detection={MAIN: {"ap50": 0.9 - 0.01 * i, "recall": 0.95}},
    )


def test_table1_has_loris_map_rows_and_no_detection_row() -> None:
    """With ``yolov5/detection`` among the rows, Table 1 lists LoRIS+MSGMSD, LoRIS+DD and the box-area
    control (each with its metrics over the two folds) but no row for the detection metrics."""
    estimates = [_fold(0), _fold(1)]
    assert f"{MAIN}/detection" in estimates[0]  # the input really carries the detector's row
    rows = table_rows(
        ScoredSet(estimates, [{}, {}]),
        {"reference": f"{MAIN}/msgmsd"},
        MAIN,
        methods=[],
        labels={},
        paper=False,
    )
    assert [(r["name"], r["row"]) for r in rows] == [
        (METHOD_NAMES["msgmsd"], f"{MAIN}/msgmsd"),
        (METHOD_NAMES["dd"], f"{MAIN}/dd"),
        (CONTROL_NAMES["control_area"], f"{MAIN}/control_area"),
    ]
    assert rows[0]["metrics"]["i_auroc"]["mean"] == pytest.approx(0.705) and rows[0]["metrics"]["i_auroc"]["n"] == 2
    assert not any("detection" in r["row"] or "DETECTION" in r["name"].upper() for r in rows)
