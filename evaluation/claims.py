"""``python -m evaluation.claims RUN``: the paper's claims as paired differences, from a finished run.

Reads ``RUN/summary.json`` and each external set's summary (an ``ablate --detectors gt,yolov5,codetr``
run) and prints, per evaluated set, each claim as a paired difference with its patient-clustered 95%
interval, then every row's pooled interval, then DeLong's per-image intervals for comparison.
Nothing is recomputed: the figures are those the run wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from evaluation.intervals import find_difference


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m evaluation.claims RUN_DIR", file=sys.stderr)
        return 2
    run = Path(args[0])
    if not (run / "summary.json").is_file():
        print(f"error: {run}/summary.json not found: give a finished run or ablate folder", file=sys.stderr)
        return 2
    sets = [("CV (5 folds)", json.loads((run / "summary.json").read_text()))]
    for e in sets[0][1].get("external", []):
        sets.append((f"held-out {Path(e['data']).name}", json.loads((run / e["report"] / "summary.json").read_text())))

    def diff(cl, a, b, m):
        for sign, (x, y) in ((1, (a, b)), (-1, (b, a))):  # a claim may name the pair in either order
            d = find_difference(cl, x, y, m)
            if d:
                p = d["pooled"]
                lo, hi = sorted((sign * p["low"], sign * p["high"]))
                return f"{100 * sign * p['estimate']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        return "-"

    def row(cl, r, m):
        c = cl["rows"].get(r, {}).get(m)
        if not c:
            return "-"
        p = c["pooled"]
        return f"{p['estimate']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"

    claims = [
        ("single mask beats RIAD: I-AUROC", "gt/msgmsd", "none/riad", "i_auroc"),
        ("single mask beats RIAD: P-AUROC", "gt/msgmsd", "none/riad", "p_auroc"),
        ("single mask beats RIAD: Dice (val)", "gt/msgmsd", "none/riad", "dice_val"),
        ("MSGMSD best I-AUROC: vs DD", "gt/msgmsd", "gt/dd", "i_auroc"),
        ("MSGMSD best I-AUROC: vs GMSD", "gt/msgmsd", "gt/gmsd", "i_auroc"),
        ("MSGMSD best I-AUROC: vs SSIM", "gt/msgmsd", "gt/ssim", "i_auroc"),
        ("DD best Dice (val): vs MSGMSD", "gt/dd", "gt/msgmsd", "dice_val"),
        ("DD best Dice (oracle): vs MSGMSD", "gt/dd", "gt/msgmsd", "dice_oracle"),
        ("YOLOv5u priors close to GT: ΔI-AUROC", "yolov5/msgmsd", "gt/msgmsd", "i_auroc"),
        ("Co-DETR priors close to GT: ΔI-AUROC", "codetr/msgmsd", "gt/msgmsd", "i_auroc"),
        ("YOLOv5u priors close to GT: ΔDice (val)", "yolov5/msgmsd", "gt/msgmsd", "dice_val"),
        ("Co-DETR priors close to GT: ΔDice (val)", "codetr/msgmsd", "gt/msgmsd", "dice_val"),
    ]
    print("| claim (row A minus row B, points) | " + " | ".join(n for n, _ in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name, a, b, m in claims:
        print(f"| {name} | " + " | ".join(diff(s["clustered"], a, b, m) for _, s in sets) + " |")
    for src in ("gt", "yolov5", "codetr"):
        for m in ("i_auroc", "p_auroc", "dice_val"):
            cells = []
            for _, s in sets:
                best = s["clustered"]["best_control"].get(src)
                cells.append(diff(s["clustered"], f"{src}/msgmsd", best, m) if best else "-")
            print(f"| LoRIS+MSGMSD beats its best control ({src} boxes): {m} | " + " | ".join(cells) + " |")
    print()
    print("| row | metric | " + " | ".join(n for n, _ in sets) + " |")
    print("|---|---|" + "---|" * len(sets))
    for r in (
        "gt/msgmsd",
        "gt/dd",
        "gt/gmsd",
        "gt/ssim",
        "none/riad",
        "gt/control_height",
        "gt/control_area",
        "yolov5/msgmsd",
        "yolov5/control_height",
        "yolov5/control_area",
        "codetr/msgmsd",
        "codetr/control_height",
        "codetr/control_area",
        "yolov5/detection",
        "codetr/detection",
    ):
        ms = ("map50", "map75") if r.endswith("detection") else ("i_auroc", "p_auroc", "dice_oracle", "dice_val")
        for m in ms:
            print(f"| {r} | {m} | " + " | ".join(row(s["clustered"], r, m) for _, s in sets) + " |")
    print()
    for n, s in sets:
        for p, c in s.get("prior_comparison", {}).items():
            print(f"DeLong {n} {p}: {100 * c['diff']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
