"""Tables 1-2 (Markdown, CSV, JSON), ``per_image.csv``, figures and a self-contained ``report.html``.

The pipeline hands over one :class:`FoldResult` per fold; everything else is derived here.
The paper's numbers are shown beside ours and marked as the paper's: they were measured on
real clinical knee data and are not numerically comparable with a run on other data.

>>> import tempfile
>>> fold = FoldResult(0, methods={"msgmsd": {"i_auroc": 0.8, "p_auroc": 0.9, "dice_oracle": 0.3, "dice_val": 0.2}})
>>> paths = write_report(tempfile.mkdtemp(), {}, [fold], {}, {})
>>> sorted(p.name for p in paths.values())[:3]
['per_image.csv', 'report.html', 'roc.png']
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.aggregate import RIAD, aggregate_methods, json_safe, ordered_methods, summary_sections
from evaluation.controls import CONTROL_NAMES
from evaluation.figures import Example, overlay_figure, roc_figure, score_distribution_figure
from evaluation.intervals import NO_PRIOR, find_difference
from evaluation.metrics import aggregate
from evaluation.paired import mean_over_folds, mean_over_models, paired_auroc
from scans.io import atomic_write_bytes, atomic_write_text

PAPER_NOTE = (
    "Rows marked 'paper' are the published numbers (Tables 1-2 of the LoRIS paper), measured on "
    "real clinical knee ultrasound (483 images, 123 distended). They are shown for orientation "
    "only and are not numerically comparable with this run's data."
)

# The paper's Dice is the oracle pooled Dice before post-processing (REFERENCE.md), so it goes
# in the "Dice (oracle)" column.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    RIAD: {"i_auroc": (0.583, 0.083), "p_auroc": (0.682, 0.016), "dice_oracle": (0.051, 0.017)},
    "msgmsd": {"i_auroc": (0.783, 0.050), "p_auroc": (0.932, 0.018), "dice_oracle": (0.263, 0.042)},
    "dd": {"i_auroc": (0.750, 0.100), "p_auroc": (0.746, 0.047), "dice_oracle": (0.353, 0.034)},
}
PAPER_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "gt": {"i_auroc": (0.783, 0.050), "p_auroc": (0.932, 0.018), "dice_oracle": (0.263, 0.042)},
    "yolov5u": {
        "precision": (0.954, 0.044),
        "map50": (0.796, 0.052),
        "map75": (0.254, 0.063),
        "i_auroc": (0.773, 0.038),
        "p_auroc": (0.872, 0.033),
        "dice_oracle": (0.223, 0.030),
    },
    "codetr": {
        "precision": (1.0, 0.0),
        "map50": (0.9, 0.035),
        "map75": (0.41, 0.066),
        "i_auroc": (0.776, 0.029),
        "p_auroc": (0.910, 0.038),
        "dice_oracle": (0.240, 0.031),
    },
}
METHOD_NAMES = {
    RIAD: "RIAD (ours, multi-mask baseline)",
    "msgmsd": "LoRIS+MSGMSD",
    "dd": "LoRIS+DD",
    "gmsd": "LoRIS+GMSD",
    "ssim": "LoRIS+SSIM",
}
PAPER_METHOD_NAMES = {RIAD: "RIAD", "msgmsd": "LoRIS+MSGMSD", "dd": "LoRIS+DD"}
PRIOR_NAMES = {"gt": "GT", "yolov5u": "YOLOv5u", "yolov5": "YOLOv5u", "codetr": "Co-DETR"}
PAPER_PRIOR_NAMES = {"gt": "GT", "yolov5u": "Yolo-V5", "codetr": "CoDETR"}
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
CONTROL_GAP = ("gap_control_i_auroc", "ΔI-AUROC vs best prior-only control (pts)")
GAP_KEYS = ["i_auroc", "p_auroc", "dice_oracle", "dice_val"]
GAP_METHOD = "msgmsd"  # Table 2's downstream method, whose ΔI-AUROC gets DeLong's interval
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
ROC_PRIOR = "gt"  # ROC curves and score histograms use the ground-truth-prior rows when present


@dataclass
class ImageRow:
    """One test image of one fold, with one prior source (a row of ``per_image.csv``).

    ``box`` is the prior box used (x1, y1, x2, y2), ``iou`` its IoU with the ground-truth box
    (1.0 for the GT prior, NaN when absent); ``scores``/``dice`` map a method to its image score
    and per-image Dice (at that method's dice_val threshold).
    """

    id: int
    patient: str
    fold: int
    label: int
    prior_source: str
    box: tuple[float, float, float, float] | None = None
    fallback: bool = False
    iou: float = math.nan
    scores: dict[str, float] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)


@dataclass
class FoldResult:
    """Everything the report needs from one fold.

    Attributes:
        fold: fold index.
        methods: ``{method: segmentation_metrics(...)}`` with the ground-truth prior; methods
            ``msgmsd``, ``dd``, ``gmsd``, ``ssim`` and ``riad`` (the multi-mask baseline).
        priors: ``{detector: segmentation_metrics(...)}`` of LoRIS+MSGMSD with that detector's boxes.
        detection: ``{detector: detection_metrics(...)}``.
        rows: per-image rows (any prior sources).
        fallbacks: test images where the detector found nothing and a fallback box was used.
        controls: ``{prior_source: {control: segmentation_metrics(...)}}`` of the prior-only
            controls (:mod:`evaluation.controls`) computed from that source's boxes.
    """

    fold: int
    methods: dict[str, dict[str, float]] = field(default_factory=dict)
    priors: dict[str, dict[str, float]] = field(default_factory=dict)
    detection: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: list[ImageRow] = field(default_factory=list)
    fallbacks: int = 0
    controls: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def summary_from_folds(folds: Sequence[FoldResult], detector: str | None = None) -> dict[str, Any]:
    """``reconstruction``/``riad``/``detection``/``priors`` parts of summary.json from fold results.

    ``detector`` picks whose detection metrics fill ``detection`` (default: the only one present).
    """
    dets = sorted({d for f in folds for d in f.detection})
    if detector is None and len(dets) == 1:
        detector = dets[0]
    det = [f.detection[detector] for f in folds if detector in f.detection] if detector else []
    priors = [f.priors for f in folds if f.priors]
    # the fallbacks of the detector reported, which need not be the fold's first prior source
    fallbacks = (
        sum(int(f.detection[detector].get("fallbacks", f.fallbacks)) for f in folds if detector in f.detection)
        if det
        else sum(f.fallbacks for f in folds)
    )
    out = summary_sections([f.methods for f in folds], det or None, fallbacks, priors or None)
    comparison = prior_comparisons(folds)
    if comparison:
        out["prior_comparison"] = comparison
    return out


def prior_comparisons(
    folds: Sequence[FoldResult], method: str = GAP_METHOD, reference: str = "gt", level: float = 0.95
) -> dict[str, dict[str, Any]]:
    """ΔI-AUROC of each detector prior against ``reference`` priors, paired per image (DeLong).

    Per fold, the images scored with both prior sources are paired by id; the result per prior
    is :func:`evaluation.paired.mean_over_folds` (disjoint test folds) or
    :func:`evaluation.paired.mean_over_models` (every fold scored the same images), with the
    per-fold tests.
    Folds where either source is missing, or a class has fewer than 2 images, are left out.
    """
    # per prior: (fold, image ids, labels, reference scores, prior scores)
    per_prior: dict[str, list[tuple[int, list[int], np.ndarray, np.ndarray, np.ndarray]]] = {}
    for f in folds:
        by_source: dict[str, dict[int, ImageRow]] = {}
        for r in f.rows:
            if method in r.scores:
                by_source.setdefault(r.prior_source, {})[r.id] = r
        ref = by_source.get(reference)
        if not ref:
            continue
        for prior, rows in by_source.items():
            ids = sorted(i for i in ref if i in rows) if prior != reference else []
            labels = np.array([ref[i].label for i in ids], int)
            if min(int(labels.sum()), int(len(labels) - labels.sum()), len(ids)) < 2:
                continue
            per_prior.setdefault(prior, []).append(
                (
                    f.fold,
                    ids,
                    labels,
                    np.array([ref[i].scores[method] for i in ids]),
                    np.array([rows[i].scores[method] for i in ids]),
                )
            )
    out: dict[str, dict[str, Any]] = {}
    for p, v in sorted(per_prior.items()):
        # Every fold's models scored the same images (an external test set): the differences are
        # correlated, so they are pooled per image rather than as independent folds.
        shared = len(v) > 1 and all(ids == v[0][1] for _, ids, *_ in v)
        test = (
            mean_over_models(v[0][2], np.stack([t[3] for t in v]), np.stack([t[4] for t in v]), level)
            if shared
            else mean_over_folds([paired_auroc(lab, a, b, level) for _, _, lab, a, b in v], level)
        )
        out[p] = {
            "reference": reference,
            "method": method,
            "folds": [t[0] for t in v],
            "test_images": "shared" if shared else ("disjoint" if len(v) > 1 else "one fold"),
            **test,
        }
    return out


# ---------------------------------------------------------------------------------------------
# tables


def _cell(stat: Mapping[str, float] | None) -> str:
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "-"
    std = stat.get("std")
    ci = f" [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]" if _finite(stat.get("ci_low"), stat.get("ci_high")) else ""
    if std is None or not math.isfinite(std):
        return f"{stat['mean']:.3f} (n={stat.get('n', 1)}){ci}"
    return f"{stat['mean']:.3f} ± {std:.3f}{ci}"


def _finite(*values: Any) -> bool:
    return all(v is not None and math.isfinite(float(v)) for v in values)


def _paper(values: Mapping[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    return {k: {"mean": m, "std": s, "n": 5, "ddof": 1} for k, (m, s) in values.items()}


def _gap(row: Mapping[str, Any], ref: Mapping[str, Any], key: str) -> dict[str, float] | None:
    a, b = row.get(key), ref.get(key)
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return None
    gap = 100.0 * (a["mean"] - b["mean"])
    return {"mean": gap, "std": math.nan} if math.isfinite(gap) else None


def _with_intervals(stats: Mapping[str, Any], clustered: Mapping[str, Any] | None, row: str) -> dict[str, Any]:
    """Copy of a row's aggregated metrics with the clustered interval of each (``ci_low``/``ci_high``)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in stats.items()}
    for metric, cell in ((clustered or {}).get("rows", {}).get(row) or {}).items():
        if metric in out and out[metric]:
            pool = cell["pooled"]
            out[metric].update(ci_low=pool["low"], ci_high=pool["high"], ci_se=pool["se"])
    return out


def _paired_gap(clustered: Mapping[str, Any] | None, a: str, b: str, metric: str) -> dict[str, float] | None:
    """A paired difference in points with its clustered interval, from :func:`clustered_summary`."""
    d = find_difference(clustered or {}, a, b, metric)
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


def build_tables(
    folds: Sequence[FoldResult], paper: bool = True, refined: bool = False, clustered: Mapping[str, Any] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Rows of Tables 1 and 2: ``{"table1": [...], "table2": [...]}``.

    Each row: ``{"name", "source": "ours"|"paper", "metrics": {key: {mean, std, ...}}}``, with
    ``ci_low``/``ci_high`` where ``clustered`` (:func:`evaluation.intervals.clustered_summary`) has the
    row. Table 2 rows add ``gap_<key>`` (points, row minus the GT row); LoRIS rows add
    ``gap_control_i_auroc`` (minus the same source's best prior-only control).
    """
    s = summary_from_folds(folds)
    cl = clustered or {}
    main = cl.get("main_source", "gt")
    best = cl.get("best_control", {})
    methods = dict(s["reconstruction"])
    if RIAD in s:
        methods = {RIAD: s[RIAD], **methods}
    t1: list[dict[str, Any]] = []
    for m, stats in methods.items():
        key = f"{NO_PRIOR}/{m}" if m == RIAD else f"{main}/{m}"
        metrics = _with_intervals(stats, cl, key)
        if m != RIAD and main in best:
            metrics[CONTROL_GAP[0]] = _paired_gap(cl, key, best[main], "i_auroc")
        t1.append({"name": METHOD_NAMES.get(m, f"LoRIS+{m.upper()}"), "source": "ours", "metrics": metrics})
        if paper and m in PAPER_TABLE1:
            t1.append({"name": PAPER_METHOD_NAMES[m], "source": "paper", "metrics": _paper(PAPER_TABLE1[m])})
    controls = {
        src: aggregate_methods([f.controls[src] for f in folds if src in f.controls])
        for src in sorted({c for f in folds for c in f.controls})
    }
    for c, stats in controls.get(main, {}).items():
        t1.append(
            {
                "name": CONTROL_NAMES.get(c, c),
                "source": "ours (control)",
                "metrics": _with_intervals(stats, cl, f"{main}/{c}"),
            }
        )

    det_agg = {
        d: aggregate([f.detection[d] for f in folds if d in f.detection])
        for d in sorted({d for f in folds for d in f.detection})
    }
    prior_agg = s.get("priors", {})
    ours: dict[str, dict[str, Any]] = {}
    # the GT row comes from the ground-truth-prior results; ``methods`` may hold a detector's
    if "gt" in prior_agg:
        ours["gt"] = dict(prior_agg["gt"])
    elif "msgmsd" in s["reconstruction"]:
        ours["gt"] = dict(s["reconstruction"]["msgmsd"])
    ours.update({p: dict(v) for p, v in prior_agg.items() if p != "gt"})
    for d, v in det_agg.items():
        ours.setdefault(d, {}).update({k: v[k] for k in ("precision", "map50", "map75") if k in v})
    t2: list[dict[str, Any]] = []
    order = (
        ["gt"]
        + [p for p in ("yolov5u", "yolov5", "codetr") if p in ours]
        + sorted(p for p in ours if p not in ("gt", "yolov5u", "yolov5", "codetr"))
    )
    for p in order:
        if p in ours:
            # Refined boxes are not the paper's raw detector output: the row says so.
            name = PRIOR_NAMES.get(p, p) + (" + refiner" if refined and p != "gt" else "")
            metrics = _with_intervals(_with_intervals(ours[p], cl, f"{p}/msgmsd"), cl, f"{p}/detection")
            for k in GAP_KEYS:
                plain = _gap(ours[p], ours.get("gt", {}), k) if p != "gt" else None
                metrics[f"gap_{k}"] = (_paired_gap(cl, f"{p}/msgmsd", "gt/msgmsd", k) or plain) if plain else None
            if p in best:
                metrics[CONTROL_GAP[0]] = _paired_gap(cl, f"{p}/msgmsd", best[p], "i_auroc")
            t2.append({"name": name, "source": "ours", "metrics": metrics})
            for c, stats in controls.get(p, {}).items():
                t2.append(
                    {
                        "name": f"{PRIOR_NAMES.get(p, p)}: {CONTROL_NAMES.get(c, c).lower()}",
                        "source": "ours (control)",
                        "metrics": _with_intervals(stats, cl, f"{p}/{c}"),
                    }
                )
        key = "yolov5u" if p == "yolov5" else p
        if paper and key in PAPER_TABLE2 and (p in ours or p == "gt"):
            pm = _paper(PAPER_TABLE2[key])
            gt_p = _paper(PAPER_TABLE2["gt"])
            for k in GAP_KEYS:
                pm[f"gap_{k}"] = _gap(pm, gt_p, k) if key != "gt" else None  # type: ignore[assignment]
            t2.append({"name": PAPER_PRIOR_NAMES[key], "source": "paper", "metrics": pm})
    return {"table1": t1, "table2": t2}


def _columns(table: str) -> list[tuple[str, str]]:
    if table == "table1":
        return TABLE1_COLS + [CONTROL_GAP]
    gaps = [(f"gap_{k}", f"Δ{label} vs GT (pts)") for k, label in TABLE1_COLS if k in GAP_KEYS]
    return TABLE2_COLS + gaps + [CONTROL_GAP]


def _gap_cell(stat: Mapping[str, float] | None) -> str:
    if not stat:
        return "-"
    if not _finite(stat.get("ci_low"), stat.get("ci_high")):
        return f"{stat['mean']:+.1f}"
    return f"{stat['mean']:+.1f} [{stat['ci_low']:+.1f}, {stat['ci_high']:+.1f}]"


def _display(table: str, row: Mapping[str, Any]) -> list[str]:
    cells = [row["name"], row["source"]]
    for key, _ in _columns(table):
        stat = row["metrics"].get(key)
        cells.append(_gap_cell(stat) if key.startswith("gap_") else _cell(stat))
    return cells


def table_markdown(table: str, rows: Sequence[Mapping[str, Any]], prior_name: str = "ground-truth") -> str:
    """Markdown table in the paper's layout, ``mean ± std`` over folds (ddof=1) [clustered 95% interval]."""
    title = {
        "table1": f"Table 1: anomaly detection and segmentation (LoRIS with {prior_name} boxes)",
        "table2": "Table 2: detectors as location priors for LoRIS+MSGMSD",
    }[table]
    head = ["Model" if table == "table1" else "Prior", "Source"] + [label for _, label in _columns(table)]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_display(table, r)) + " |" for r in rows]
    lines += [
        "",
        "mean ± std across folds (sample std, ddof=1). " + INTERVAL_NOTE + " Dice (oracle): threshold "
        "tuned on the test fold itself (the paper's, before post-processing); Dice (oracle, post): the same "
        "oracle after closing-then-opening; Dice (val): threshold chosen on the validation fold, "
        "closing-then-opening 3x3. " + GAP_NOTE,
        "",
        PAPER_NOTE,
        "",
    ]
    return "\n".join(lines)


def table_csv(table: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV with ``<key>_mean``/``<key>_std``/``<key>_ci_low``/``<key>_ci_high`` columns (empty when absent)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = [k for k, _ in _columns(table)]
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
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["a", "b", "metric", "estimate", "ci_low", "ci_high", "se", "per_fold_estimates"])
    for d in clustered.get("differences", []):
        p = d["pooled"]
        w.writerow(
            [
                d["a"],
                d["b"],
                d["metric"],
                _num(p["estimate"]),
                _num(p["low"]),
                _num(p["high"]),
                _num(p["se"]),
                " ".join(_num(f["estimate"]) for f in d["per_fold"]),
            ]
        )
    return buf.getvalue()


def _num(v: Any) -> str:
    if v is None:
        return ""
    v = float(v)
    return "" if not math.isfinite(v) else repr(v)


def per_image_csv(folds: Sequence[FoldResult]) -> str:
    """``per_image.csv``: id, patient, fold, label, prior source, box, IoU, each score, each Dice."""
    rows = [r for f in folds for r in f.rows]
    score_keys = ordered_methods(sorted({k for r in rows for k in r.scores}))
    dice_keys = ordered_methods(sorted({k for r in rows for k in r.dice}))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
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
        + [f"score_{k}" for k in score_keys]
        + [f"dice_{k}" for k in dice_keys]
    )
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


# ---------------------------------------------------------------------------------------------
# figures


def _score_sets(folds: Sequence[FoldResult]) -> tuple[dict[str, dict[int, tuple[list[float], list[int]]]], str]:
    """``{method: {fold: (scores, labels)}}`` from the rows of one prior source (GT if present)."""
    sources = [r.prior_source for f in folds for r in f.rows]
    prior = ROC_PRIOR if ROC_PRIOR in sources else (sources[0] if sources else ROC_PRIOR)
    curves: dict[str, dict[int, tuple[list[float], list[int]]]] = {}
    for f in folds:
        for r in f.rows:
            if r.prior_source != prior:
                continue
            for m, s in r.scores.items():
                sc, lb = curves.setdefault(m, {}).setdefault(f.fold, ([], []))
                sc.append(float(s))
                lb.append(int(r.label))
    return {m: curves[m] for m in ordered_methods(list(curves))}, prior


def write_figures(out_dir: Path, folds: Sequence[FoldResult], examples: Sequence[Example]) -> dict[str, Path]:
    """Write ``overlays.png`` (if examples), ``roc.png`` and ``scores.png`` under ``out_dir``."""
    curves, _ = _score_sets(folds)
    pooled = {
        m: ([s for sc, _ in d.values() for s in sc], [y for _, lb in d.values() for y in lb]) for m, d in curves.items()
    }
    out: dict[str, Path] = {}
    figs = {"roc": roc_figure(curves), "scores": score_distribution_figure(pooled)}
    if examples:
        figs["overlays"] = overlay_figure(examples)
    for name, png in figs.items():
        path = out_dir / f"{name}.png"
        atomic_write_bytes(path, png)
        out[name] = path
    return out


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """body{font-family:DejaVu Sans,Arial,sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #bbb;padding:4px 8px}
tr.paper td{color:#777;font-style:italic;background:#f6f6f6}img{max-width:100%}pre{background:#f4f4f4;
padding:1em;overflow:auto;font-size:0.85em}.note{color:#555;font-size:0.9em}"""


def _html_table(table: str, rows: Sequence[Mapping[str, Any]]) -> str:
    head = ["Model" if table == "table1" else "Prior", "Source"] + [label for _, label in _columns(table)]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cls = ' class="paper"' if r["source"] == "paper" else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in _display(table, r)) + "</tr>")
    return "\n".join(out) + "</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def render_html(
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    figures: Mapping[str, Path],
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    versions: Mapping[str, Any],
    links: Sequence[str],
) -> str:
    """One self-contained page: figures are embedded as base64; ``links`` are relative file names."""
    captions = {
        "overlays": "Best, median and worst cases per class: scan | reconstruction | anomaly map | "
        "ground truth | prediction",
        "roc": "Image-level ROC curves per fold (ground-truth prior)",
        "scores": "Image scores per class, all folds",
    }
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>LoRIS report</title>",
        f"<style>{_CSS}</style></head><body><h1>LoRIS evaluation report</h1>",
        f"<p>Detector: <b>{html.escape(str(summary.get('detector', '-')))}</b>; data: "
        f"{html.escape(str(summary.get('data', '-')))}; folds: {html.escape(str(summary.get('folds', '-')))}</p>",
        f"<p class='note'>{html.escape(PAPER_NOTE)}</p>",
        "<h2>Table 1: anomaly detection and segmentation</h2>",
        _html_table("table1", tables["table1"]),
        "<h2>Table 2: detectors as location priors</h2>",
        _html_table("table2", tables["table2"]),
        "<p class='note'>mean ± std across folds (ddof=1). " + html.escape(INTERVAL_NOTE) + " Dice (oracle) "
        "tunes its threshold on the test fold itself, as the paper does, so it is optimistic (Dice (oracle, "
        "post): after closing-then-opening); Dice (val) chooses it on the validation fold and applies "
        f"closing-then-opening 3x3. {html.escape(GAP_NOTE)}</p>",
        "<h2>Figures</h2>",
    ]
    parts += [_img(p, captions.get(k, k)) for k, p in figures.items()]
    parts.append(
        "<h2>Files</h2><ul>"
        + "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in links)
        + "</ul>"
    )
    parts += [
        "<h2>Summary</h2><pre>",
        html.escape(json.dumps(json_safe(summary), indent=2)),
        "</pre>",
        "<h2>Configuration</h2><pre>",
        html.escape(json.dumps(json_safe(config), indent=2, default=str)),
        "</pre>",
        "<h2>Versions</h2><table>",
        "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in versions.items()),
        "</table></body></html>",
    ]
    return "\n".join(parts)


def write_report(
    out_dir: Path | str,
    summary: Mapping[str, Any],
    folds: Sequence[FoldResult],
    config: Mapping[str, Any],
    versions: Mapping[str, Any],
    examples: Sequence[Example] = (),
    *,
    paper: bool = True,
    prior_name: str = "ground-truth",
    figures: bool = True,
    clustered: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write tables (md/csv/json), per_image.csv, figures and report.html; every file atomically.

    ``summary`` is the run's summary.json content (shown verbatim; tables are recomputed from
    ``folds``). Returns ``{name: path}`` of the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    detector_cfg = config.get("detector") if isinstance(config.get("detector"), Mapping) else {}
    tables = build_tables(
        folds,
        paper=paper,
        refined=bool(detector_cfg.get("refine")),  # type: ignore[union-attr]
        clustered=clustered,
    )
    written: dict[str, Path] = {}
    for t, rows in tables.items():
        for ext, text in (
            ("md", table_markdown(t, rows, prior_name)),
            ("csv", table_csv(t, rows)),
            ("json", json.dumps(json_safe({"table": t, "note": PAPER_NOTE, "rows": rows}), indent=2)),
        ):
            path = out_dir / f"{t}.{ext}"
            atomic_write_text(path, text)
            written[f"{t}.{ext}"] = path
    if clustered:
        for name, text in (
            ("differences.md", differences_markdown(clustered)),
            ("differences.csv", differences_csv(clustered)),
        ):
            atomic_write_text(out_dir / name, text)
            written[name] = out_dir / name
    atomic_write_text(out_dir / "per_image.csv", per_image_csv(folds))
    written["per_image.csv"] = out_dir / "per_image.csv"
    figures = write_figures(out_dir, folds, examples) if figures else {}
    written.update({f"{k}.png": p for k, p in figures.items()})
    links = sorted(n for n in written)
    atomic_write_text(out_dir / "report.html", render_html(tables, figures, summary, config, versions, links))
    written["report.html"] = out_dir / "report.html"
    return written
