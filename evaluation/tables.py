"""Tables 1-2 as rows, Markdown and CSV; the paired-differences table; ``per_image.csv``.

The paper's numbers are shown beside ours and marked as the paper's: they were measured on real
clinical knee data and are not numerically comparable with a run on other data. They are keyed by
the paper's own rows (``PAPER_TABLE2``); a prior source reaches its paper row through
:attr:`evaluation.results.SourceLabel.paper_row`.

>>> fold = FoldResult(0, methods={"msgmsd": {"i_auroc": 0.8}}, priors={"toy": {"i_auroc": 0.7}})
>>> rows = build_tables([fold], paper=False, labels={"toy": SourceLabel("Toy")})["table2"]
>>> [r["name"] for r in rows], round(rows[1]["metrics"]["gap_i_auroc"]["mean"], 6)
(['gt', 'Toy'], -10.0)
>>> print(table_markdown("table2", rows).splitlines()[5])
| Toy | ours | - | - | - | 0.700 (n=1) | - | - | - | - | -10.0 | - | - | - | - |
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evaluation.aggregate import RIAD, aggregate_methods, ordered_methods, summary_from_folds
from evaluation.comparison import COMPARED_METHOD
from evaluation.controls import CONTROL_NAMES
from evaluation.intervals import NO_PRIOR, find_difference
from evaluation.metrics import aggregate
from evaluation.results import GROUND_TRUTH, FoldResult, Labels, SourceLabel, source_label, source_order

Row = dict[str, Any]  # {"name", "source": "ours" | "ours (control)" | "paper", "metrics": {key: stat}}

PAPER_NOTE = (
    "Rows marked 'paper' are the published numbers (Tables 1-2 of the LoRIS paper), measured on "
    "real clinical knee ultrasound (483 images, 123 distended). They are shown for orientation "
    "only and are not numerically comparable with this run's data."
)


@dataclass(frozen=True)
class PaperRow:
    """One published row: its name in the paper and ``{metric: (mean, std)}`` over 5 folds."""

    name: str
    values: Mapping[str, tuple[float, float]]


# The paper's Dice is the oracle pooled Dice before post-processing (docs/design.md), so it goes
# in the "Dice (oracle)" column.
PAPER_TABLE1: dict[str, PaperRow] = {
    RIAD: PaperRow("RIAD", {"i_auroc": (0.583, 0.083), "p_auroc": (0.682, 0.016), "dice_oracle": (0.051, 0.017)}),
    "msgmsd": PaperRow(
        "LoRIS+MSGMSD", {"i_auroc": (0.783, 0.050), "p_auroc": (0.932, 0.018), "dice_oracle": (0.263, 0.042)}
    ),
    "dd": PaperRow("LoRIS+DD", {"i_auroc": (0.750, 0.100), "p_auroc": (0.746, 0.047), "dice_oracle": (0.353, 0.034)}),
    # the peers' rows of the paper's Table 1, keyed by `compare`'s method names
    "patchcore": PaperRow(
        "PatchCore", {"i_auroc": (0.701, 0.090), "p_auroc": (0.871, 0.009), "dice_oracle": (0.193, 0.066)}
    ),
    # the paper ran SimpleNet, of which anomalib's SuperSimpleNet is the successor
    "supersimplenet": PaperRow(
        "SimpleNet", {"i_auroc": (0.680, 0.104), "p_auroc": (0.818, 0.010), "dice_oracle": (0.144, 0.047)}
    ),
    "cflow": PaperRow("CFlow", {"i_auroc": (0.645, 0.125), "p_auroc": (0.864, 0.011), "dice_oracle": (0.124, 0.049)}),
    "uae": PaperRow("UAE", {"i_auroc": (0.621, 0.068), "p_auroc": (0.699, 0.014), "dice_oracle": (0.061, 0.018)}),
    "intrans": PaperRow(
        "InTrans", {"i_auroc": (0.581, 0.053), "p_auroc": (0.574, 0.033), "dice_oracle": (0.028, 0.009)}
    ),
    "ganomaly": PaperRow("GANomaly", {"i_auroc": (0.573, 0.035)}),
    "draem": PaperRow("DRAEM", {"i_auroc": (0.547, 0.066), "p_auroc": (0.626, 0.041), "dice_oracle": (0.033, 0.007)}),
    "fair": PaperRow("FAIR", {"i_auroc": (0.544, 0.035), "p_auroc": (0.668, 0.021), "dice_oracle": (0.102, 0.012)}),
    "multitask": PaperRow("Multi-task (supervised)", {"i_auroc": (0.780, 0.050)}),
}
PAPER_GT_ROW = "gt"  # the paper's ground-truth-prior row, the reference of its Δ columns
PAPER_TABLE2: dict[str, PaperRow] = {
    PAPER_GT_ROW: PaperRow("GT", {"i_auroc": (0.783, 0.050), "p_auroc": (0.932, 0.018), "dice_oracle": (0.263, 0.042)}),
    "yolov5u": PaperRow(
        "Yolo-V5",
        {
            "precision": (0.954, 0.044),
            "map50": (0.796, 0.052),
            "map75": (0.254, 0.063),
            "i_auroc": (0.773, 0.038),
            "p_auroc": (0.872, 0.033),
            "dice_oracle": (0.223, 0.030),
        },
    ),
    "codetr": PaperRow(
        "CoDETR",
        {
            "precision": (1.0, 0.0),
            "map50": (0.9, 0.035),
            "map75": (0.41, 0.066),
            "i_auroc": (0.776, 0.029),
            "p_auroc": (0.910, 0.038),
            "dice_oracle": (0.240, 0.031),
        },
    ),
}
METHOD_NAMES = {
    RIAD: "RIAD (ours, multi-mask baseline)",
    "msgmsd_c170": "LoRIS-IB (MSGMSD, GMSD's c)",
    "msgmsd": "LoRIS+MSGMSD",
    "dd": "LoRIS+DD",
    "gmsd": "LoRIS+GMSD",
    "ssim": "LoRIS+SSIM",
}
TABLE1_COLS = [
    ("i_auroc", "I-AUROC"),
    ("p_auroc", "P-AUROC"),
    ("dice_oracle", "Dice (oracle)"),
    ("dice_oracle_post", "Dice (oracle, post)"),
    ("dice_val", "Dice (val)"),
]
TABLE2_COLS = [
    ("precision", "precision"),
    ("map50", "mAP@50"),
    ("map75", "mAP@75"),
    ("i_auroc", "I-AUROC"),
    ("p_auroc", "P-AUROC"),
    ("dice_oracle", "Dice (oracle)"),
    ("dice_oracle_post", "Dice (oracle, post)"),
    ("dice_val", "Dice (val)"),
]
DETECTION_KEYS = ("precision", "map50", "map75")
CONTROL_GAP = ("gap_control_i_auroc", "ΔI-AUROC vs best prior-only control (pts)")
GAP_KEYS = ["i_auroc", "p_auroc", "dice_oracle", "dice_val"]
GAP_NOTE = (
    "Δ columns: paired differences in points, the row minus the reference on the same test images, "
    "[brackets] their 95% patient-clustered bootstrap interval. DeLong's per-image interval of ΔI-AUROC vs "
    "GT is in summary.json (prior_comparison); it treats images of one patient as independent."
)
INTERVAL_NOTE = (
    "[brackets]: 95% patient-cluster bootstrap interval of the mean over folds (patients resampled "
    "with all their images within each test fold, 2000 replicates; on an external set one draw of "
    "its patients is shared by every fold's models); test-set sampling only, the trained models "
    "held fixed. Prior only: the image score is the prior box's height or area and the map is 1 "
    "inside the masked box, no image used; LoRIS must beat it."
)
TITLES = {
    "table1": "Table 1: anomaly detection and segmentation (LoRIS with {prior} boxes)",
    "table2": "Table 2: detectors as location priors for LoRIS+MSGMSD",
}
DICE_NOTE = (
    "Dice (oracle): threshold tuned on the test fold itself (the paper's, before post-processing); "
    "Dice (oracle, post): the same oracle after closing-then-opening; Dice (val): threshold chosen on the "
    "validation fold, closing-then-opening 3x3."
)


# ---------------------------------------------------------------------------------------------
# cells


def cell(stat: Mapping[str, float] | None) -> str:
    """``mean ± std [ci_low, ci_high]`` of one aggregated metric; ``-`` when absent.

    >>> cell({"mean": 0.7, "std": 0.1, "ci_low": 0.6, "ci_high": 0.8}), cell({"mean": 0.5, "n": 1}), cell(None)
    ('0.700 ± 0.100 [0.600, 0.800]', '0.500 (n=1)', '-')
    """
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "-"
    std = stat.get("std")
    ci = f" [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]" if _finite(stat.get("ci_low"), stat.get("ci_high")) else ""
    if std is None or not math.isfinite(std):
        return f"{stat['mean']:.3f} (n={stat.get('n', 1)}){ci}"
    return f"{stat['mean']:.3f} ± {std:.3f}{ci}"


def gap_cell(stat: Mapping[str, float] | None) -> str:
    """A difference in points, ``+1.2 [-0.3, +2.5]``; ``-`` when absent.

    >>> gap_cell({"mean": 1.25, "ci_low": -0.3, "ci_high": 2.5}), gap_cell({"mean": -0.7}), gap_cell(None)
    ('+1.2 [-0.3, +2.5]', '-0.7', '-')
    """
    if not stat:
        return "-"
    if not _finite(stat.get("ci_low"), stat.get("ci_high")):
        return f"{stat['mean']:+.1f}"
    return f"{stat['mean']:+.1f} [{stat['ci_low']:+.1f}, {stat['ci_high']:+.1f}]"


def _finite(*values: Any) -> bool:
    return all(v is not None and math.isfinite(float(v)) for v in values)


def _num(v: Any) -> str:
    if v is None:
        return ""
    v = float(v)
    return "" if not math.isfinite(v) else repr(v)


# ---------------------------------------------------------------------------------------------
# rows


def _paper(values: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    return {k: {"mean": m, "std": s, "n": 5, "ddof": 1} for k, (m, s) in values.items()}


def _gap(row: Mapping[str, Any], ref: Mapping[str, Any], key: str) -> dict[str, float] | None:
    a, b = row.get(key), ref.get(key)
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return None
    gap = 100.0 * (a["mean"] - b["mean"])
    return {"mean": gap, "std": math.nan} if math.isfinite(gap) else None


def _with_intervals(stats: Mapping[str, Any], clustered: Mapping[str, Any], row: str) -> dict[str, Any]:
    """Copy of a row's aggregated metrics with the clustered interval of each (``ci_low``/``ci_high``)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in stats.items()}
    for metric, c in (clustered.get("rows", {}).get(row) or {}).items():
        if metric in out and out[metric]:
            pool = c["pooled"]
            out[metric].update(ci_low=pool["low"], ci_high=pool["high"], ci_se=pool["se"])
    return out


def _paired_gap(clustered: Mapping[str, Any], a: str, b: str | None, metric: str) -> dict[str, float] | None:
    """A paired difference in points with its clustered interval, from :func:`clustered_summary`."""
    d = find_difference(clustered, a, b, metric) if b else None
    if d is None:
        return None
    p = d["pooled"]
    return {
        "mean": 100.0 * p["estimate"],
        "ci_low": 100.0 * p["low"],
        "ci_high": 100.0 * p["high"],
        "std": math.nan,
        "reference": b,
    }


def _control_rows(folds: Sequence[FoldResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{source: {control: aggregated metrics}}`` of the prior-only controls."""
    return {
        src: aggregate_methods([f.controls[src] for f in folds if src in f.controls])
        for src in sorted({c for f in folds for c in f.controls})
    }


def _table1(
    s: Mapping[str, Any], controls: Mapping[str, Mapping[str, Any]], cl: Mapping[str, Any], paper: bool
) -> list[Row]:
    """Each method under the main source (RIAD without a prior), the paper's rows, the controls."""
    main = cl.get("main_source", GROUND_TRUTH)
    best = cl.get("best_control", {})
    methods = {RIAD: s[RIAD], **s["reconstruction"]} if RIAD in s else dict(s["reconstruction"])
    rows: list[Row] = []
    for m, stats in methods.items():
        key = f"{NO_PRIOR}/{m}" if m == RIAD else f"{main}/{m}"
        metrics = _with_intervals(stats, cl, key)
        if m != RIAD and main in best:
            metrics[CONTROL_GAP[0]] = _paired_gap(cl, key, best[main], "i_auroc")
        rows.append({"name": METHOD_NAMES.get(m, f"LoRIS+{m.upper()}"), "source": "ours", "metrics": metrics})
        if paper and m in PAPER_TABLE1:
            rows.append({"name": PAPER_TABLE1[m].name, "source": "paper", "metrics": _paper(PAPER_TABLE1[m].values)})
    for c, stats in controls.get(main, {}).items():
        name = CONTROL_NAMES.get(c, c)
        rows.append({"name": name, "source": "ours (control)", "metrics": _with_intervals(stats, cl, f"{main}/{c}")})
    return rows


def _prior_metrics(folds: Sequence[FoldResult], s: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{source: aggregated LoRIS+MSGMSD metrics (+ detection metrics)}`` of every prior source."""
    ours: dict[str, dict[str, Any]] = {}
    prior_agg = s.get("priors", {})
    # the GT row comes from the ground-truth-prior results; ``methods`` may hold a detector's
    if GROUND_TRUTH in prior_agg:
        ours[GROUND_TRUTH] = dict(prior_agg[GROUND_TRUTH])
    elif COMPARED_METHOD in s["reconstruction"]:
        ours[GROUND_TRUTH] = dict(s["reconstruction"][COMPARED_METHOD])
    for p, v in prior_agg.items():
        ours.setdefault(p, dict(v))
    for d in sorted({d for f in folds for d in f.detection}):
        v = aggregate([f.detection[d] for f in folds if d in f.detection])
        ours.setdefault(d, {}).update({k: v[k] for k in DETECTION_KEYS if k in v})
    return ours


def _ours_prior_rows(
    p: str,
    label: SourceLabel,
    ours: Mapping[str, Mapping[str, Any]],
    controls: Mapping[str, Mapping[str, Any]],
    cl: Mapping[str, Any],
    refined: bool,
) -> list[Row]:
    """Table 2's row of prior source ``p`` with its Δ columns, then its controls."""
    gt = GROUND_TRUTH
    # refined boxes are not the paper's raw detector output: the row says so
    name = label.display + (" + refiner" if refined and p != gt else "")
    metrics = _with_intervals(_with_intervals(ours[p], cl, f"{p}/{COMPARED_METHOD}"), cl, f"{p}/detection")
    for k in GAP_KEYS:
        plain = _gap(ours[p], ours.get(gt, {}), k) if p != gt else None
        paired = _paired_gap(cl, f"{p}/{COMPARED_METHOD}", f"{gt}/{COMPARED_METHOD}", k)
        metrics[f"gap_{k}"] = (paired or plain) if plain else None
    if p in cl.get("best_control", {}):
        metrics[CONTROL_GAP[0]] = _paired_gap(cl, f"{p}/{COMPARED_METHOD}", cl["best_control"][p], "i_auroc")
    rows: list[Row] = [{"name": name, "source": "ours", "metrics": metrics}]
    for c, stats in controls.get(p, {}).items():
        ctrl = f"{label.display}: {CONTROL_NAMES.get(c, c).lower()}"
        rows.append({"name": ctrl, "source": "ours (control)", "metrics": _with_intervals(stats, cl, f"{p}/{c}")})
    return rows


def _paper_prior_row(paper_row: str) -> Row:
    """The paper's Table 2 row with its own Δ columns against the paper's GT row."""
    pm = _paper(PAPER_TABLE2[paper_row].values)
    gt = _paper(PAPER_TABLE2[PAPER_GT_ROW].values)
    for k in GAP_KEYS:
        pm[f"gap_{k}"] = _gap(pm, gt, k) if paper_row != PAPER_GT_ROW else None
    return {"name": PAPER_TABLE2[paper_row].name, "source": "paper", "metrics": pm}


def build_tables(
    folds: Sequence[FoldResult],
    paper: bool = True,
    refined: bool = False,
    clustered: Mapping[str, Any] | None = None,
    *,
    labels: Labels | None = None,
) -> dict[str, list[Row]]:
    """Rows of Tables 1 and 2: ``{"table1": [...], "table2": [...]}``.

    Each row: ``{"name", "source": "ours"|"paper", "metrics": {key: {mean, std, ...}}}``, with
    ``ci_low``/``ci_high`` where ``clustered`` (:func:`evaluation.intervals.clustered_summary`) has the
    row. Table 2 rows add ``gap_<key>`` (points, row minus the GT row); LoRIS rows add
    ``gap_control_i_auroc`` (minus the same source's best prior-only control). Table 2 names and
    orders prior sources by ``labels`` (:func:`evaluation.results.source_order`); each source's paper
    row, if it has one, follows its own rows.
    """
    s = summary_from_folds(folds)
    cl = clustered or {}
    controls = _control_rows(folds)
    ours = _prior_metrics(folds, s)
    t2: list[Row] = []
    for p in source_order({*ours, GROUND_TRUTH}, labels):
        label = source_label(p, labels)
        if p in ours:
            t2 += _ours_prior_rows(p, label, ours, controls, cl, refined)
        if paper and label.paper_row is not None and label.paper_row in PAPER_TABLE2:
            t2.append(_paper_prior_row(label.paper_row))
    return {"table1": _table1(s, controls, cl, paper), "table2": t2}


# ---------------------------------------------------------------------------------------------
# text


def columns(table: str) -> list[tuple[str, str]]:
    """``(metric key, column title)`` of ``"table1"`` or ``"table2"`` after the name and source."""
    if table == "table1":
        return TABLE1_COLS + [CONTROL_GAP]
    gaps = [(f"gap_{k}", f"Δ{label} vs GT (pts)") for k, label in TABLE1_COLS if k in GAP_KEYS]
    return TABLE2_COLS + gaps + [CONTROL_GAP]


def header(table: str) -> list[str]:
    """Column titles of a table, name and source included."""
    return ["Model" if table == "table1" else "Prior", "Source"] + [label for _, label in columns(table)]


def display_cells(table: str, row: Mapping[str, Any]) -> list[str]:
    """A row's cells as shown in Markdown and HTML."""
    cells = [row["name"], row["source"]]
    for key, _ in columns(table):
        stat = row["metrics"].get(key)
        cells.append(gap_cell(stat) if key.startswith("gap_") else cell(stat))
    return cells


def table_markdown(table: str, rows: Sequence[Mapping[str, Any]], prior_name: str = "ground-truth") -> str:
    """Markdown table in the paper's layout, ``mean ± std`` over folds (ddof=1) [clustered 95% interval].

    ``rows`` come named from :func:`build_tables`; ``prior_name`` is the prior of Table 1's title.
    """
    head = header(table)
    lines = [
        f"# {TITLES[table].format(prior=prior_name)}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(display_cells(table, r)) + " |" for r in rows]
    lines += [
        "",
        "mean ± std across folds (sample std, ddof=1). " + INTERVAL_NOTE + " " + DICE_NOTE + " " + GAP_NOTE,
        "",
        PAPER_NOTE,
        "",
    ]
    return "\n".join(lines)


def table_csv(table: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV with ``<key>_mean``/``<key>_std``/``<key>_ci_low``/``<key>_ci_high`` columns (empty when absent)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = [k for k, _ in columns(table)]
    parts = ("mean", "std", "ci_low", "ci_high")
    w.writerow(["name", "source"] + [f"{k}_{s}" for k in keys for s in parts])
    for r in rows:
        vals: list[Any] = [r["name"], r["source"]]
        for k in keys:
            stat = r["metrics"].get(k) or {}
            vals += [_num(stat.get(s)) for s in parts]
        w.writerow(vals)
    return buf.getvalue()


def differences_markdown(clustered: Mapping[str, Any]) -> str:
    """Every paired difference of a run, pooled over folds, with its clustered interval (points)."""
    lines = [
        "# Paired differences (row A minus row B, same test images)",
        "",
        "| A | B | metric | Δ (pts) [95% clustered CI] | per fold |",
        "|---|---|---|---|---|",
    ]
    for d in clustered.get("differences", []):
        p = d["pooled"]
        folds = ", ".join(f"{100 * f['estimate']:+.1f}" for f in d["per_fold"])
        lines.append(
            f"| {d['a']} | {d['b']} | {d['metric']} | {100 * p['estimate']:+.1f} "
            f"[{100 * p['low']:+.1f}, {100 * p['high']:+.1f}] | {folds} |"
        )
    lines += [
        "",
        "Rows are <prior source>/<method>: 'none/riad' is RIAD (no prior), 'control_*' the prior-only "
        "controls. " + INTERVAL_NOTE,
        "",
    ]
    return "\n".join(lines)


def differences_csv(clustered: Mapping[str, Any]) -> str:
    """The differences of :func:`differences_markdown` as fractions, one row each."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["a", "b", "metric", "estimate", "ci_low", "ci_high", "se", "per_fold_estimates"])
    for d in clustered.get("differences", []):
        p = d["pooled"]
        estimates = " ".join(_num(f["estimate"]) for f in d["per_fold"])
        w.writerow([d["a"], d["b"], d["metric"], *(_num(p[k]) for k in ("estimate", "low", "high", "se")), estimates])
    return buf.getvalue()


PER_IMAGE_COLUMNS = [
    "id",
    "patient",
    "fold",
    "label",
    "prior_source",
    "prior_fallback",
    "box_x1",
    "box_y1",
    "box_x2",
    "box_y2",
    "iou",
]


def per_image_csv(folds: Sequence[FoldResult]) -> str:
    """``per_image.csv``: id, patient, fold, label, prior source, box, IoU, each score, each Dice."""
    rows = [r for f in folds for r in f.rows]
    score_keys = ordered_methods(sorted({k for r in rows for k in r.scores}))
    dice_keys = ordered_methods(sorted({k for r in rows for k in r.dice}))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PER_IMAGE_COLUMNS + [f"score_{k}" for k in score_keys] + [f"dice_{k}" for k in dice_keys])
    for r in rows:
        box = list(r.box) if r.box is not None else [None] * 4
        w.writerow(
            [r.id, r.patient, r.fold, r.label, r.prior_source, int(r.fallback)]
            + [_num(v) for v in box]
            + [_num(r.iou)]
            + [_num(r.scores.get(k)) for k in score_keys]
            + [_num(r.dice.get(k)) for k in dice_keys]
        )
    return buf.getvalue()
