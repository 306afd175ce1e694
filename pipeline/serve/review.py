"""A review page for a ``predict`` output folder: one self-contained ``index.html``, sorted by score.

The page lists every scan of ``predictions.csv`` (highest score first) with its verdict at the
bundle's threshold, score, calibrated probability of distension (a whole percentage, "<1%" and
">99%" at the ends, empty without a calibration or for a cell that is not a number in [0, 1]), box
source and overlay thumbnail, plus the unreadable files of ``errors.csv``. Thumbnails are relative
links to the PNGs ``predict`` wrote (nothing is re-encoded); a scan without an overlay
(``predict`` writes them only with ``--overlays``) gets a short placeholder. Only the current
page's images are in the document, so a folder of thousands of scans opens at once. It works
offline: no external scripts, styles or fonts. Rows carry only the file path (and the SOP Instance
UID or frame when ``predict`` wrote them), never patient tags or the mask RLE (docs/design.md,
"Outputs for clinicians and PACS").

Keys: ``j``/``↓`` next scan, ``k``/``↑`` previous, ``→``/``←`` next/previous page, ``Enter``
enlarges the selected overlay, ``f`` cycles the filter (all, distended, errors), ``s`` the sort.
The view is kept in the URL hash, e.g. ``index.html#sort=file&filter=distended&page=2`` (sort:
``score``, ``score-asc`` or ``file``), so a link or a reload opens the same view. When the page
has been built the script writes ``data-ready-ms`` (and, once the first page's images are in,
``data-load-ms``) on ``<html>``: milliseconds since navigation start.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "predictions.csv").write_text("file,score,verdict,threshold\\na.png,0.2,not distended,0.5\\n")
>>> write_review(d).name
'index.html'
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from runtime.io import atomic_write_text

# The only columns the page carries: none identifies a patient, and the mask RLE is not for display.
ROW_FIELDS = (
    "file",
    "sop_instance_uid",
    "frame",
    "score",
    "probability",
    "verdict",
    "threshold",
    "box_source",
    "box_confidence",
    "overlay",
    "width",
    "height",
)
ERROR_FIELDS = ("file", "frame", "sop_instance_uid", "reason")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _link(out: Path, rel: str) -> str:
    """A URL relative to the page for an output file, or '' for a path outside ``out`` or missing.

    >>> _link(Path("."), "../x.png"), _link(Path("."), "/etc/passwd")
    ('', '')
    """
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or not (out / p).is_file():
        return ""
    return "/".join(quote(part) for part in p.parts)


def _score(row: dict[str, str]) -> float:
    try:
        v = float(row.get("score", "nan"))
    except ValueError:
        return math.nan
    return v


# A plain decimal as predict writes it (an exponent allowed): no sign, nan, inf, underscores or formulas.
_DECIMAL = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _percent(cell: str | None) -> str:
    """The ``probability`` cell as a whole percentage, or '' when it is not a plain number in [0, 1].

    >>> [_percent(c) for c in ("0.004", "0.5", "0.8749", "0.996", "1", "", "nan", "1.7", "=1/2", "+0.5")]
    ['<1%', '50%', '87%', '>99%', '>99%', '', '', '', '', '']
    """
    text = (cell or "").strip()
    if not _DECIMAL.fullmatch(text):
        return ""
    p = Decimal(text)
    if p > 1:
        return ""
    pct = int((p * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    # a calibrated probability is never certain: the ends say so rather than "0%" or "100%"
    return "<1%" if pct < 1 else ">99%" if pct > 99 else f"{pct}%"


def load_rows(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Scan rows sorted by score (highest first, unscored last) and error rows, whitelisted columns only.

    A row has no ``overlay`` key when ``predict`` wrote none, and ``overlay == ""`` when the one
    named is missing or outside ``out``. ``probability`` is the display text of :func:`_percent`,
    absent when the cell is empty, missing (older folders) or not a number in [0, 1].
    """
    out = Path(out)
    rows: list[dict[str, Any]] = []
    read = _read_csv(out / "predictions.csv")
    per_file = Counter(r.get("file") for r in read)
    for r in read:
        row: dict[str, Any] = {k: r[k] for k in ROW_FIELDS if r.get(k) not in (None, "")}
        if row.get("frame") == "0" and per_file[r.get("file")] == 1:
            del row["frame"]  # a single frame needs no frame label
        s = _score(r)
        row["score"] = None if math.isnan(s) else s
        if "overlay" in row:
            row["overlay"] = _link(out, row["overlay"])
        if pct := _percent(row.pop("probability", None)):
            row["probability"] = pct
        rows.append(row)
    rows.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0), r.get("file", "")))
    errors = [{k: r[k] for k in ERROR_FIELDS if r.get(k)} for r in _read_csv(out / "errors.csv")]
    return rows, errors


def _json_for_script(data: Any) -> str:
    """JSON that cannot close the ``<script>`` element it is embedded in.

    >>> _json_for_script({"f": "</script>"})
    '{"f": "\\\\u003c/script\\\\u003e"}'
    """
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(rows: list[dict[str, Any]], errors: list[dict[str, str]], title: str, page_size: int = 50) -> str:
    """The page as a string (rows already sorted)."""
    data = {"rows": rows, "errors": errors, "pageSize": max(1, int(page_size))}
    return _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", _json_for_script(data))


def write_review(out: Path, name: str = "index.html", page_size: int = 50) -> Path:
    """Write ``out/name`` for the ``predict`` output folder ``out`` (atomically); returns its path."""
    out = Path(out)
    if not (out / "predictions.csv").is_file() and not (out / "errors.csv").is_file():
        raise FileNotFoundError(f"{out}: no predictions.csv or errors.csv (is it a predict output folder?)")
    rows, errors = load_rows(out)
    target = out / name
    atomic_write_text(target, render(rows, errors, f"LoRIS review: {out.name}", page_size))
    return target


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:.5em 1em;z-index:2}
header h1{font-size:1.1em;margin:0 0 .3em}
main{padding:1em}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:.3em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
tr.sel{outline:3px solid #1a73e8;outline-offset:-3px}
td.num{font-variant-numeric:tabular-nums;text-align:right}
.distended{color:#b00020;font-weight:600}.ok{color:#1b5e20}
img.thumb{height:96px;image-rendering:pixelated;cursor:zoom-in}
.noimg{white-space:nowrap;color:#666;font-size:.85em}
#big{display:none;position:fixed;inset:0;background:rgba(0,0,0,.85);z-index:3;align-items:center;justify-content:center}
#big img{max-width:95vw;max-height:95vh;image-rendering:pixelated}
.muted{color:#666;font-size:.9em}
</style></head>
<body>
<header><h1>__TITLE__</h1>
<label>Show <select id="filter"><option value="all">all scans</option>
<option value="distended">distended only</option><option value="errors">errors</option></select></label>
<label>Sort <select id="sort"><option value="score-desc">score, highest first</option>
<option value="score-asc">score, lowest first</option><option value="file">file</option></select></label>
<button id="prev">&larr;</button> <span id="page"></span> <button id="next">&rarr;</button>
<span id="count" class="muted"></span>
<div class="muted">j/k or &darr;/&uarr;: scan &middot; &larr;/&rarr;: page &middot; Enter: enlarge &middot;
f: filter &middot; s: sort</div></header>
<main><table><thead id="head"></thead><tbody id="body"></tbody></table></main>
<div id="big" role="dialog"><img alt="overlay"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const S = {filter: "all", sort: "score-desc", page: 0, sel: 0};
const $ = (id) => document.getElementById(id);
const byName = new Intl.Collator("en", {numeric: true});
const TIPS = {probability: "calibrated probability of distension (empty: the bundle has no calibration)"};
function cell(tr, text, cls) {
  const td = tr.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function note(td, text) {
  const s = document.createElement("span"); s.className = "noimg"; s.textContent = text; td.appendChild(s);
}
function label(v) { return typeof v === "string" ? v : ""; }
function fmt(v) { return v === null || v === undefined ? "" : Number(v).toPrecision(4); }
function options(id) { return Array.from($(id).options).map((o) => o.value); }
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  const sort = h.get("sort") === "score" ? "score-desc" : h.get("sort");
  if (options("sort").includes(sort)) S.sort = sort;
  if (options("filter").includes(h.get("filter"))) S.filter = h.get("filter");
  const p = parseInt(h.get("page"), 10);
  S.page = p > 0 ? p - 1 : 0;
  $("sort").value = S.sort; $("filter").value = S.filter;
}
function writeHash() {
  const h = "#sort=" + S.sort + "&filter=" + S.filter + "&page=" + (S.page + 1);
  if (location.hash !== h) history.replaceState(null, "", h);
}
function items() {
  if (S.filter === "errors") return D.errors.slice();
  const r = D.rows.filter((x) => S.filter === "all" || x.verdict === "distended");
  const scored = (a, b, d) => (a.score === null) - (b.score === null) || d * ((a.score || 0) - (b.score || 0));
  if (S.sort === "score-asc") r.sort((a, b) => scored(a, b, 1));
  else if (S.sort === "file") r.sort((a, b) => byName.compare(a.file || "", b.file || ""));
  else r.sort((a, b) => scored(a, b, -1));
  return r;
}
function thumb(td, x, i) {
  if (x.overlay === undefined) { note(td, "no overlay (run predict with --overlays)"); return; }
  if (!x.overlay) { note(td, "overlay not found"); return; }
  const img = document.createElement("img");
  img.className = "thumb"; img.decoding = "async"; img.alt = "overlay of " + x.file;
  img.addEventListener("error", () => { img.remove(); note(td, "overlay not readable"); });
  img.addEventListener("click", () => { S.sel = i; enlarge(); });
  img.src = x.overlay;
  td.appendChild(img);
}
function render() {
  const all = items(), n = Math.max(1, Math.ceil(all.length / D.pageSize));
  S.page = Math.min(Math.max(S.page, 0), n - 1);
  const view = all.slice(S.page * D.pageSize, (S.page + 1) * D.pageSize);
  S.sel = Math.min(Math.max(S.sel, 0), Math.max(view.length - 1, 0));
  const head = $("head"), body = $("body");
  head.textContent = ""; body.textContent = "";
  const hr = head.insertRow();
  const cols = S.filter === "errors" ? ["#", "file", "reason"]
    : ["#", "overlay", "file", "score", "probability", "threshold", "verdict", "box source"];
  for (const c of cols) {
    const th = document.createElement("th"); th.textContent = c; if (TIPS[c]) th.title = TIPS[c]; hr.appendChild(th);
  }
  view.forEach((x, i) => {
    const tr = body.insertRow();
    tr.dataset.i = i; tr.dataset.file = x.file || "";
    if (i === S.sel) tr.className = "sel";
    cell(tr, S.page * D.pageSize + i + 1, "num");
    if (S.filter === "errors") {
      tr.className += " error";
      cell(tr, (x.file || "") + (x.frame ? " [frame " + x.frame + "]" : "")); cell(tr, x.reason || ""); return;
    }
    tr.dataset.score = x.score === null ? "" : x.score;
    thumb(tr.insertCell(), x, i);
    const f = cell(tr, x.file || "");
    if (x.sop_instance_uid) f.title = "SOP Instance UID " + x.sop_instance_uid;
    if (x.frame) f.textContent += " [frame " + x.frame + "]";
    cell(tr, fmt(x.score), "num"); cell(tr, label(x.probability), "num"); cell(tr, fmt(x.threshold), "num");
    cell(tr, x.verdict || "", x.verdict === "distended" ? "distended" : "ok");
    cell(tr, (x.box_source || "") + (x.box_confidence ? " (" + fmt(x.box_confidence) + ")" : ""));
    tr.addEventListener("click", () => { S.sel = i; render(); });
  });
  $("page").textContent = "page " + (S.page + 1) + " / " + n;
  $("count").textContent = all.length + (S.filter === "errors" ? " error(s)" : " scan(s)")
    + " \\u00b7 " + D.rows.filter((x) => x.verdict === "distended").length + " distended of " + D.rows.length
    + (D.errors.length ? " \\u00b7 " + D.errors.length + " error(s)" : "");
  writeHash();
  const sel = body.querySelector("tr.sel");
  if (sel && sel.scrollIntoView) sel.scrollIntoView({block: "nearest"});
}
function enlarge() {
  const x = items()[S.page * D.pageSize + S.sel];
  if (!x || !x.overlay) return;
  const big = $("big"); big.querySelector("img").src = x.overlay; big.style.display = "flex";
}
function closeBig() { $("big").style.display = "none"; }
function cycle(id, key) {
  const opts = options(id);
  S[key] = opts[(opts.indexOf(S[key]) + 1) % opts.length]; $(id).value = S[key]; S.page = 0; S.sel = 0; render();
}
$("filter").addEventListener("change", (e) => { S.filter = e.target.value; S.page = 0; S.sel = 0; render(); });
$("sort").addEventListener("change", (e) => { S.sort = e.target.value; S.page = 0; S.sel = 0; render(); });
$("prev").addEventListener("click", () => { S.page--; S.sel = 0; render(); });
$("next").addEventListener("click", () => { S.page++; S.sel = 0; render(); });
$("big").addEventListener("click", closeBig);
window.addEventListener("hashchange", () => { readHash(); S.sel = 0; render(); });
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "SELECT" || e.altKey || e.ctrlKey || e.metaKey) return;
  const k = e.key;
  if ($("big").style.display === "flex") { if (k === "Escape" || k === "Enter") closeBig(); return; }
  if (k === "j" || k === "ArrowDown") { S.sel++; if (S.sel >= D.pageSize) { S.page++; S.sel = 0; } }
  else if (k === "k" || k === "ArrowUp") { S.sel--; if (S.sel < 0 && S.page > 0) { S.page--; S.sel = D.pageSize - 1; } }
  else if (k === "ArrowRight") { S.page++; S.sel = 0; }
  else if (k === "ArrowLeft") { S.page--; S.sel = 0; }
  else if (k === "Enter") { enlarge(); return; }
  else if (k === "f") { cycle("filter", "filter"); return; }
  else if (k === "s") { cycle("sort", "sort"); return; }
  else return;
  e.preventDefault(); render();
});
readHash();
render();
document.documentElement.dataset.readyMs = performance.now().toFixed(1);
window.addEventListener("load", () => { document.documentElement.dataset.loadMs = performance.now().toFixed(1); });
</script>
</body></html>
"""
