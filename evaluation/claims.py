"""``python -m evaluation.claims RUN``: the paper's claims as paired differences, from a finished run.

Reads ``RUN/summary.json`` and each external set's summary (an ``ablate --detectors gt,yolov5,codetr``
run) and prints, per evaluated set, each claim as a paired difference with its patient-clustered 95%
interval, then every row's pooled interval, then DeLong's per-image intervals for comparison.
Nothing is recomputed: the figures are those the run wrote. Prior sources are named by the
``labels`` section of summary.json (:func:`evaluation.results.labels_to_json`), else by their own name.

>>> cl = {"differences": [{"a": "x/msgmsd", "b": "gt/msgmsd", "metric": "i_auroc",
...        "pooled": {"estimate": 0.02, "low": -0.01, "high": 0.05}}]}
>>> diff_cell(cl, "gt/msgmsd", "x/msgmsd", "i_auroc")
'-2.0 [-5.0, +1.0]'
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.aggregate import RIAD
from evaluation.controls import CONTROLS
from evaluation.intervals import LORIS_MAPS, NO_PRIOR, find_difference
from evaluation.results import GROUND_TRUTH, Labels, labels_from_json, source_label, source_order

Set = tuple[str, Mapping[str, Any]]  # (name of the evaluated set, its summary.json)

GT = GROUND_TRUTH
# (claim, row A, row B, metric): the paper's claims about the methods, all under ground-truth boxes
METHOD_CLAIMS = [
    ("single mask beats RIAD: I-AUROC", f"{GT}/msgmsd", f"{NO_PRIOR}/{RIAD}", "i_auroc"),
    ("single mask beats RIAD: P-AUROC", f"{GT}/msgmsd", f"{NO_PRIOR}/{RIAD}", "p_auroc"),
    ("single mask beats RIAD: Dice (val)", f"{GT}/msgmsd", f"{NO_PRIOR}/{RIAD}", "dice_val"),
    ("MSGMSD best I-AUROC: vs DD", f"{GT}/msgmsd", f"{GT}/dd", "i_auroc"),
    ("MSGMSD best I-AUROC: vs GMSD", f"{GT}/msgmsd", f"{GT}/gmsd", "i_auroc"),
    ("MSGMSD best I-AUROC: vs SSIM", f"{GT}/msgmsd", f"{GT}/ssim", "i_auroc"),
    ("DD best Dice (val): vs MSGMSD", f"{GT}/dd", f"{GT}/msgmsd", "dice_val"),
    ("DD best Dice (oracle): vs MSGMSD", f"{GT}/dd", f"{GT}/msgmsd", "dice_oracle"),
]
PRIOR_CLAIM_METRICS = [("i_auroc", "ΔI-AUROC"), ("dice_val", "ΔDice (val)")]
CONTROL_CLAIM_METRICS = ("i_auroc", "p_auroc", "dice_val")
ROW_METRICS = ("i_auroc", "p_auroc", "dice_oracle", "dice_val")
DETECTION_METRICS = ("map50", "map75")


def diff_cell(cl: Mapping[str, Any], a: str, b: str, m: str) -> str:
    """``a - b`` in points with its interval, whichever order the run computed it in; ``-`` if absent."""
    for sign, (x, y) in ((1, (a, b)), (-1, (b, a))):
        d = find_difference(cl, x, y, m)
        if d:
            p = d["pooled"]
            lo, hi = sorted((sign * p["low"], sign * p["high"]))
            return f"{100 * sign * p['estimate']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return "-"


def row_cell(cl: Mapping[str, Any], r: str, m: str) -> str:
    """A row's pooled estimate with its interval; ``-`` if absent."""
    c = cl["rows"].get(r, {}).get(m)
    if not c:
        return "-"
    p = c["pooled"]
    return f"{p['estimate']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"


def detector_sources(sets: Sequence[Set], labels: Labels) -> list[str]:
    """The run's detector prior sources (rows ``<source>/...`` other than GT and no prior), label order."""
    names = {r.split("/")[0] for _, s in sets for r in s["clustered"]["rows"]} - {GT, NO_PRIOR}
    return source_order(names, labels)


def _table(title: str, sets: Sequence[Set], lines: list[tuple[str, list[str]]]) -> list[str]:
    cols = title.count("|") - 1
    out = [f"{title} " + " | ".join(n for n, _ in sets) + " |", "|" + "---|" * (cols + len(sets))]
    return out + [f"{head} | " + " | ".join(cells) + " |" for head, cells in lines]


def claim_lines(sets: Sequence[Set], sources: Sequence[str], labels: Labels) -> list[str]:
    """The claims table: the methods', each detector's prior against GT, LoRIS against its best control."""
    claims = list(METHOD_CLAIMS)
    for m, title in PRIOR_CLAIM_METRICS:
        for src in sources:
            name = f"{source_label(src, labels).display} priors close to GT: {title}"
            claims.append((name, f"{src}/msgmsd", f"{GT}/msgmsd", m))
    lines = [(f"| {n}", [diff_cell(s["clustered"], a, b, m) for _, s in sets]) for n, a, b, m in claims]
    for src in (GT, *sources):
        for m in CONTROL_CLAIM_METRICS:
            cells = []
            for _, s in sets:
                best = s["clustered"]["best_control"].get(src)
                cells.append(diff_cell(s["clustered"], f"{src}/msgmsd", best, m) if best else "-")
            lines.append((f"| LoRIS+MSGMSD beats its best control ({src} boxes): {m}", cells))
    return _table("| claim (row A minus row B, points) |", sets, lines)


def row_lines(sets: Sequence[Set], sources: Sequence[str]) -> list[str]:
    """Every row's pooled interval: GT methods, RIAD, controls, each detector's prior, detection."""
    present = {r for _, s in sets for r in s["clustered"].get("rows", {})}
    rows = [f"{GT}/{m}" for m in LORIS_MAPS if f"{GT}/{m}" in present]  # runs made before a map existed
    rows += [f"{NO_PRIOR}/{RIAD}"] + [f"{GT}/{c}" for c in CONTROLS]
    rows += [r for src in sources for r in (f"{src}/msgmsd", *(f"{src}/{c}" for c in CONTROLS))]
    rows += [f"{src}/detection" for src in sources]
    lines = []
    for r in rows:
        for m in DETECTION_METRICS if r.endswith("/detection") else ROW_METRICS:
            lines.append((f"| {r} | {m}", [row_cell(s["clustered"], r, m) for _, s in sets]))
    return _table("| row | metric |", sets, lines)


def delong_lines(sets: Sequence[Set]) -> list[str]:
    """DeLong's per-image ΔI-AUROC of each prior against GT, per evaluated set."""
    return [
        f"DeLong {n} {p}: {100 * c['diff']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"
        for n, s in sets
        for p, c in s.get("prior_comparison", {}).items()
    ]


def load_sets(run: Path) -> list[Set]:
    """The run's own summary, then each external set's."""
    sets: list[Set] = [("CV (5 folds)", json.loads((run / "summary.json").read_text()))]
    for e in sets[0][1].get("external", []):
        sets.append((f"held-out {Path(e['data']).name}", json.loads((run / e["report"] / "summary.json").read_text())))
    return sets


def main(argv: list[str] | None = None) -> int:
    from runtime.env import setup_environment

    setup_environment()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m evaluation.claims RUN_DIR", file=sys.stderr)
        return 2
    run = Path(args[0])
    if not (run / "summary.json").is_file():
        print(f"error: {run}/summary.json not found: give a finished run or ablate folder", file=sys.stderr)
        return 2
    sets = load_sets(run)
    labels = labels_from_json(sets[0][1].get("labels"))
    sources = detector_sources(sets, labels)
    print("\n".join([*claim_lines(sets, sources, labels), "", *row_lines(sets, sources), "", *delong_lines(sets)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
