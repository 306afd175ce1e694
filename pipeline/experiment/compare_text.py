"""``compare``'s tables as text: Table 1 in Markdown and CSV (``table1.md|csv|json``, ``differences.md|csv``),
the self-contained ``report.html`` page, and the closing lines printed at the end
(:mod:`pipeline.experiment.compare_report` computes the rows).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.aggregate import json_safe
from evaluation.rescoring import ECE_COLUMN, ECE_NOTE, POOLING_NOTE
from evaluation.tables import (
    GAP_KEYS,
    INTERVAL_NOTE,
    PAPER_NOTE,
    TABLE1_COLS,
    cell,
    differences_csv,
    differences_markdown,
    gap_cell,
)
from pipeline import registry
from runtime.io import atomic_write_text

Row = dict[str, Any]  # {"name", "source", "code", "row", "maps", "metrics": {key: stat}}
GAP_TITLES = {"i_auroc": "I-AUROC", "p_auroc": "P-AUROC", "dice_oracle": "Dice oracle", "dice_val": "Dice val"}
COLUMNS = TABLE1_COLS + [ECE_COLUMN] + [(f"gap_{k}", f"Δ{GAP_TITLES[k]} (pts)") for k in GAP_KEYS]
NOTES = (
    "mean ± std across folds (sample std, ddof=1). " + INTERVAL_NOTE,
    "Δ columns: the reference row (the map of LoRIS's verdict, bundle.score_map; the first row) minus the row, "
    "in points, on the same test scans with the same bootstrap draws [95% patient-clustered interval]; "
    "positive: the reference is ahead. differences.md also has the reference under the other pooling rule "
    "minus every row.",
    "Every method trains on the same patient-grouped folds: the unsupervised ones on the normal training "
    "scans only, the supervised Multi-task on both classes. Peers score the whole image (no location "
    "prior), those 'in prior box' in the boxes LoRIS's rows get (the annotations, or the run's detector's); "
    "methods without a map (GANomaly, Multi-task) have I-AUROC only.",
    "'own implementation': written for this project from the method's paper, not anomalib's; "
    "'random init': no ImageNet weights (trained from scratch).",
    "Dice (oracle): threshold tuned on the test fold itself (the paper's); Dice (val): threshold chosen "
    "on the validation fold, closing-then-opening.",
    POOLING_NOTE,
    ECE_NOTE,
    PAPER_NOTE,
)


# ----------------------------------------------------------------------------- tables as text


def _cells(row: Mapping[str, Any]) -> list[str]:
    cells = [row["name"], row["source"], row["code"]]
    for key, _ in COLUMNS:
        stat = row["metrics"].get(key)
        cells.append(gap_cell(stat) if key.startswith("gap_") else cell(stat))
    return cells


def _title(main: str) -> str:
    return f"Table 1 in full: LoRIS with {registry.prior_phrase(main)} boxes beside RIAD and the peers, same folds"


def table_markdown(rows: Sequence[Row], main: str) -> str:
    """The table in Markdown, ``mean ± std [clustered 95% interval]``, with its notes."""
    head = ["Model", "Source", "Code"] + [t for _, t in COLUMNS]
    lines = [f"# {_title(main)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines + [""] + [n + "\n" for n in NOTES])


def _num(v: Any) -> str:
    return "" if v is None or not math.isfinite(float(v)) else repr(float(v))


def table_csv(rows: Sequence[Row]) -> str:
    """One line per row: name, source, code, maps, then ``<key>_mean|std|ci_low|ci_high`` per column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    parts = ("mean", "std", "ci_low", "ci_high")
    w.writerow(["name", "source", "code", "row", "maps"] + [f"{k}_{p}" for k, _ in COLUMNS for p in parts])
    for r in rows:
        vals = [r["name"], r["source"], r["code"], r["row"], int(r["maps"])]
        w.writerow(vals + [_num((r["metrics"].get(k) or {}).get(p)) for k, _ in COLUMNS for p in parts])
    return buf.getvalue()


def write_tables(where: Path, rows: Sequence[Row], main: str, cl: Mapping[str, Any]) -> list[str]:
    """``table1.md|csv|json`` and ``differences.md|csv`` under ``where``; returns the file names."""
    doc = {"table": "table1", "title": _title(main), "reference": cl["reference"], "notes": NOTES, "rows": rows}
    files = {
        "table1.md": table_markdown(rows, main),
        "table1.csv": table_csv(rows),
        "table1.json": json.dumps(json_safe(doc), indent=1),
        "differences.md": differences_markdown(cl),
        "differences.csv": differences_csv(cl),
    }
    where.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(where / name, text)
    return list(files)


# ----------------------------------------------------------------------------- the page and the closing lines


_CSS = """body{font-family:DejaVu Sans,Arial,sans-serif;max-width:1300px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.85em}td,th{border:1px solid #bbb;padding:3px 6px}
tr.paper td{color:#777;font-style:italic;background:#f6f6f6}img{max-width:100%}pre{background:#f4f4f4;
padding:1em;overflow:auto;font-size:0.8em}.note{color:#555;font-size:0.9em}"""


def _html_table(rows: Sequence[Row]) -> str:
    head = ["Model", "Source", "Code"] + [t for _, t in COLUMNS]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cls = ' class="paper"' if r["source"] == "paper" else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>")
    return "\n".join(out) + "</table>"


def render_html(summary: Mapping[str, Any], png: bytes | None, files: Sequence[str]) -> str:
    """One self-contained page: the table, its notes, the figure (embedded), files, summary and versions."""
    main = str(summary["detector"])
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>LoRIS comparison</title><style>{_CSS}</style>",
        f"</head><body><h1>{html.escape(_title(main))}</h1>",
        f"<p>Data: {html.escape(str(summary.get('data')))}; folds: {summary.get('folds')}; profile: "
        f"{html.escape(str(summary.get('profile')))}; methods: {html.escape(', '.join(summary['methods']))}</p>",
        _html_table(summary["table1"]),
        *(f"<p class='note'>{html.escape(n)}</p>" for n in NOTES),
    ]
    if png:
        data = base64.b64encode(png).decode("ascii")
        caption = (
            "Each method's anomaly map and segmentation on the same three distended test scans (cf. the paper's Fig. 2)"
        )
        parts.append(f"<h2>Figure</h2><figure><img alt='{caption}' src='data:image/png;base64,{data}'>")
        parts.append(f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append(
        "<h2>Files</h2><ul>" + "".join(f'<li><a href="{html.escape(f)}">{html.escape(f)}</a></li>' for f in files)
    )
    doc = {k: v for k, v in summary.items() if k not in ("table1", "versions", "config")}
    parts += ["</ul><h2>Summary</h2><pre>", html.escape(json.dumps(json_safe(doc), indent=1, default=str)), "</pre>"]
    parts.append("<h2>Versions</h2><table>")
    parts += [
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in summary.get("versions", {}).items()
    ]
    return "\n".join(parts + ["</table></body></html>"])


def _ci(stat: Mapping[str, Any] | None) -> str:
    return cell(stat) if stat else "-"


def summary_lines(summary: Mapping[str, Any], out: Path) -> list[str]:
    """The closing lines: each row's I-AUROC, P-AUROC and Dice (val) with intervals, and ΔI-AUROC."""
    lines = [f"results in {out} (report.html, table1.md, summary.json); [95% patient-clustered intervals]"]
    for r in summary["table1"]:
        if r["source"] == "paper":
            continue
        m = r["metrics"]
        cells = [f"{k} {_ci(m.get(k))}" for k in ("i_auroc", "p_auroc", "dice_val", "ece") if m.get(k)]
        gap = m.get("gap_i_auroc")
        lines.append(
            f"  {r['name']:42s} "
            + ", ".join(cells)
            + (f"; the reference minus it: ΔI-AUROC {gap_cell(gap)} pts" if gap else "")
        )
    return lines
