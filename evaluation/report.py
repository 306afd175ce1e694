"""The run's report files: Tables 1-2 (Markdown, CSV, JSON), ``per_image.csv``, figures and ``report.html``.

The pipeline hands over one :class:`~evaluation.results.FoldResult` per fold and the
:class:`~evaluation.results.SourceLabel` of each prior source; tables come from
:mod:`evaluation.tables`, figures from :mod:`evaluation.figures`.

>>> import tempfile
>>> fold = FoldResult(0, methods={"msgmsd": {"i_auroc": 0.8, "p_auroc": 0.9, "dice_oracle": 0.3, "dice_val": 0.2}})
>>> paths = write_report(tempfile.mkdtemp(), {}, [fold], {}, {})
>>> sorted(p.name for p in paths.values())[:3]
['per_image.csv', 'report.html', 'roc.png']
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.aggregate import json_safe, ordered_methods, summary_from_folds
from evaluation.comparison import prior_comparisons
from evaluation.figures import Example, overlay_figure, roc_figure, score_distribution_figure
from evaluation.results import GROUND_TRUTH, FoldResult, ImageRow, Labels, source_label
from evaluation.tables import (
    GAP_NOTE,
    INTERVAL_NOTE,
    PAPER_NOTE,
    build_tables,
    differences_csv,
    differences_markdown,
    display_cells,
    header,
    per_image_csv,
    table_csv,
    table_markdown,
)
from runtime.io import atomic_write_bytes, atomic_write_text

ROC_PRIOR = GROUND_TRUTH  # ROC curves and score histograms use the ground-truth-prior rows when present
Curves = dict[str, dict[int, tuple[list[float], list[int]]]]  # {method: {fold: (scores, labels)}}


# ---------------------------------------------------------------------------------------------
# figures


def _score_sets(folds: Sequence[FoldResult]) -> tuple[Curves, str]:
    """``{method: {fold: (scores, labels)}}`` from the rows of one prior source (GT if present)."""
    sources = [r.prior_source for f in folds for r in f.rows]
    prior = ROC_PRIOR if ROC_PRIOR in sources else (sources[0] if sources else ROC_PRIOR)
    curves: Curves = {}
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
CAPTIONS = {
    "overlays": "Best, median and worst cases per class: scan | reconstruction | anomaly map | "
    "ground truth | prediction",
    "roc": "Image-level ROC curves per fold (ground-truth prior)",
    "scores": "Image scores per class, all folds",
}


def _html_table(table: str, rows: Sequence[Mapping[str, Any]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header(table)) + "</tr>"]
    for r in rows:
        cls = ' class="paper"' if r["source"] == "paper" else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in display_cells(table, r)) + "</tr>")
    return "\n".join(out) + "</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
    )


def _pre(title: str, doc: Any) -> list[str]:
    return [f"<h2>{title}</h2><pre>", html.escape(json.dumps(json_safe(doc), indent=2, default=str)), "</pre>"]


def render_html(
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    figures: Mapping[str, Path],
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    versions: Mapping[str, Any],
    links: Sequence[str],
) -> str:
    """One self-contained page: figures are embedded as base64; ``links`` are relative file names."""
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
    parts += [_img(p, CAPTIONS.get(k, k)) for k, p in figures.items()]
    parts.append(
        "<h2>Files</h2><ul>"
        + "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in links)
        + "</ul>"
    )
    parts += _pre("Summary", summary) + _pre("Configuration", config)
    parts += [
        "<h2>Versions</h2><table>",
        "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in versions.items()),
        "</table></body></html>",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# files


def main_prior_name(clustered: Mapping[str, Any] | None, labels: Labels | None = None) -> str:
    """How Table 1's title names its prior: ``ground-truth``, or the main source's display name.

    >>> main_prior_name(None), main_prior_name({"main_source": "toy"}), main_prior_name({"main_source": "gt"})
    ('ground-truth', 'toy', 'ground-truth')
    """
    main = (clustered or {}).get("main_source", GROUND_TRUTH)
    return "ground-truth" if main == GROUND_TRUTH else source_label(main, labels).display


def _write_tables(out_dir: Path, tables: Mapping[str, Sequence[Mapping[str, Any]]], prior_name: str) -> dict[str, Path]:
    written: dict[str, Path] = {}
    for t, rows in tables.items():
        for ext, text in (
            ("md", table_markdown(t, rows, prior_name)),
            ("csv", table_csv(t, rows)),
            ("json", json.dumps(json_safe({"table": t, "note": PAPER_NOTE, "rows": rows}), indent=2)),
        ):
            written[f"{t}.{ext}"] = out_dir / f"{t}.{ext}"
            atomic_write_text(written[f"{t}.{ext}"], text)
    return written


def _write_differences(out_dir: Path, clustered: Mapping[str, Any]) -> dict[str, Path]:
    written: dict[str, Path] = {}
    for name, text in (
        ("differences.md", differences_markdown(clustered)),
        ("differences.csv", differences_csv(clustered)),
    ):
        written[name] = out_dir / name
        atomic_write_text(written[name], text)
    return written


def write_report(
    out_dir: Path | str,
    summary: Mapping[str, Any],
    folds: Sequence[FoldResult],
    config: Mapping[str, Any],
    versions: Mapping[str, Any],
    examples: Sequence[Example] = (),
    *,
    paper: bool = True,
    prior_name: str | None = None,
    figures: bool = True,
    clustered: Mapping[str, Any] | None = None,
    labels: Labels | None = None,
    refined: bool | None = None,
) -> dict[str, Path]:
    """Write tables (md/csv/json), per_image.csv, figures and report.html; every file atomically.

    ``summary`` is the run's summary.json content (shown verbatim; tables are recomputed from
    ``folds``). ``labels`` name and order the prior sources (:class:`~evaluation.results.SourceLabel`);
    ``prior_name`` (Table 1's prior) defaults to :func:`main_prior_name`; ``refined`` (detector boxes
    refined) defaults to ``config["detector"]["refine"]``. Returns ``{name: path}`` of the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if refined is None:
        detector_cfg = config.get("detector")
        refined = bool(detector_cfg.get("refine")) if isinstance(detector_cfg, Mapping) else False
    tables = build_tables(folds, paper=paper, refined=refined, clustered=clustered, labels=labels)
    written = _write_tables(out_dir, tables, prior_name or main_prior_name(clustered, labels))
    if clustered:
        written.update(_write_differences(out_dir, clustered))
    atomic_write_text(out_dir / "per_image.csv", per_image_csv(folds))
    written["per_image.csv"] = out_dir / "per_image.csv"
    pngs = write_figures(out_dir, folds, examples) if figures else {}
    written.update({f"{k}.png": p for k, p in pngs.items()})
    links = sorted(written)
    atomic_write_text(out_dir / "report.html", render_html(tables, pngs, summary, config, versions, links))
    written["report.html"] = out_dir / "report.html"
    return written


__all__ = [  # the data model, summary and tables are re-exported for callers of the one-module report
    "FoldResult",
    "ImageRow",
    "build_tables",
    "main_prior_name",
    "prior_comparisons",
    "render_html",
    "summary_from_folds",
    "table_markdown",
    "write_figures",
    "write_report",
]
