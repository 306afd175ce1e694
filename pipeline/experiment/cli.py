"""The experiment commands of ``loris``: ``run``, ``ablate``, ``compare``, ``aggregate`` and ``bench``
(:data:`COMMANDS`, each adding its parser; mounted by :mod:`pipeline.__main__`), and the closing summary
they print. Nothing here imports the serving side (:mod:`pipeline.serve`); the heavy imports wait for the
handler, after ``main`` has set the environment up."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.cli_args import add_common_arguments, config_from_args, fold_list


def _external(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--external",
        type=Path,
        action="append",
        help="held-out dataset folder: also evaluate "
        "every fold's models on all of it (reported under <out>/external/); repeatable, one "
        "report per set under <out>/external/<name>/",
    )


def _run_parser(sub: Any) -> None:
    """``run``: choices and defaults from the detector registry."""
    from pipeline import registry

    run = sub.add_parser("run", help="cross-validate LoRIS with one prior source (Table 1)")
    run.add_argument("--detector", choices=registry.names(), default=registry.ground_truth())
    run.add_argument("--folds", type=fold_list, help="comma-separated fold indices, e.g. 0,2 (default: all)")
    run.add_argument("--out", type=Path, help="run folder (default: runs/<command>-<detector>-<profile>-<time>)")
    add_common_arguments(run)
    _external(run)
    run.set_defaults(handler=_cross_validate)


def _ablate_parser(sub: Any) -> None:
    """``ablate``: every prior source of the registry by default."""
    from pipeline import registry

    names = registry.names()
    abl = sub.add_parser("ablate", help="ground-truth against predicted priors, sharing the U-Nets (Table 2)")
    abl.add_argument(
        "--detectors", default=",".join(names), help=f"comma-separated prior sources from {', '.join(names)}"
    )
    abl.add_argument("--folds", type=fold_list, help="comma-separated fold indices (default: all)")
    abl.add_argument("--out", type=Path)
    add_common_arguments(abl)
    _external(abl)
    abl.set_defaults(handler=_cross_validate)


def _compare_parser(sub: Any) -> None:
    """``compare``: LoRIS beside RIAD and the Table 1 peers on the same folds."""
    from pipeline.experiment.compare import add_arguments

    cmp = sub.add_parser("compare", help="LoRIS, RIAD and the Table 1 peers on the same folds (Table 1 in full)")
    add_arguments(cmp)  # --methods, --detector, --folds, --out, --external
    add_common_arguments(cmp)
    cmp.set_defaults(handler=_compare)


def _aggregate_parser(sub: Any) -> None:
    """``aggregate``: one report from fold-parallel runs."""
    ag = sub.add_parser("aggregate", help="one report from fold-parallel runs (`run --folds k --out RUN_k` each)")
    ag.add_argument(
        "runs", type=Path, nargs="+", metavar="RUN_DIR", help="finished run folders, one or more folds each"
    )
    ag.add_argument("--out", type=Path, required=True, help="folder for the tables, summary and report")
    ag.add_argument(
        "--mixed-runtime",
        action="store_true",
        help="pool runs made with different world sizes, backends or thread counts (refused by default)",
    )
    ag.set_defaults(handler=_aggregate)


def _bench_parser(sub: Any) -> None:
    be = sub.add_parser("bench", help="measure stage throughput on this machine")
    be.add_argument("--out", type=Path, help="write the measurements as JSON here")
    be.add_argument("--quick", action="store_true", help="fewer repeats (for smoke tests)")
    be.add_argument("--model", type=Path, help="a bundle from `train`: also measure end-to-end predict images/s")
    be.add_argument(
        "--peers",
        help="Table 1 peers to fit and run on a small phantom: comma-separated names, `table1` (all but the "
        "*_box variants), `all` or `none` (default: the single-pass memory-bank peers, cheap on a CPU)",
    )
    be.set_defaults(handler=_bench)


COMMANDS: dict[str, Callable[[Any], None]] = {
    "run": _run_parser,
    "ablate": _ablate_parser,
    "compare": _compare_parser,
    "aggregate": _aggregate_parser,
    "bench": _bench_parser,
}


def _cross_validate(args: argparse.Namespace) -> int:
    from pipeline.experiment.run import execute
    from pipeline.run_dirs import default_run_dir

    names = [args.detector] if args.command == "run" else [d.strip() for d in args.detectors.split(",") if d.strip()]
    if not names:
        raise ValueError("--detectors: name at least one prior source")
    cfg = config_from_args(args, names[0])
    out = Path(args.out) if args.out else default_run_dir(cfg, args.command)
    summary = execute(cfg, out, names, command=args.command)
    from runtime.distributed import is_main

    if is_main():  # under torchrun every rank returns the summary; one prints it
        _print_summary(summary, out)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pipeline.experiment.compare import cli, parse_methods

    parse_methods(args.methods)  # refuse a bad method name before anything loads
    return cli(args, config_from_args(args, args.detector))


def _aggregate(args: argparse.Namespace) -> int:
    from pipeline.experiment.aggregate import aggregate_runs

    _print_summary(aggregate_runs(args.runs, args.out, args.mixed_runtime), args.out)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pipeline.bench.suite import parse_peers, run_bench, table_lines

    peers = parse_peers(args.peers)  # refuse a bad peer name before the long measurements
    res = run_bench(quick=args.quick, model=args.model, peers=peers)
    text = json.dumps(res, indent=1)
    print(text)
    print("\n".join(table_lines(res)), file=sys.stderr)  # stdout stays the JSON alone
    if args.out:
        from runtime.io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


def _ci(d: dict[str, Any] | None, scale: float = 1.0, fmt: str = ".3f") -> str:
    if not d or any(d.get(k) is None or d[k] != d[k] for k in ("low", "high")):  # None or NaN: no interval
        return ""
    return f" [{scale * d['low']:{fmt}}, {scale * d['high']:{fmt}}]"


def _row(cl: dict[str, Any], label: str, key: str, metrics: dict[str, Any]) -> str:
    """One method or control: each metric's mean with its pooled interval."""
    cells = []
    for m in ("i_auroc", "p_auroc", "dice_oracle", "dice_val"):
        v = metrics.get(m, {})
        if v.get("mean") is not None:
            iv = cl.get("rows", {}).get(key, {}).get(m, {}).get("pooled")
            cells.append(f"{m} {v['mean']:.3f}{_ci(iv)}")
    return f"  {label:30s} " + ", ".join(cells)


def _method_lines(summary: dict[str, Any]) -> list[str]:
    """Every method and prior-only control of the summary, with intervals."""
    from evaluation.controls import CONTROL_NAMES

    cl = summary.get("clustered", {})
    main = summary["detector"] if isinstance(summary["detector"], str) else summary["detector"][0]
    lines = [_row(cl, f"LoRIS+{n.upper()}", f"{main}/{n}", m) for n, m in summary.get("reconstruction", {}).items()]
    if "riad" in summary:
        lines.append(_row(cl, "RIAD", "none/riad", summary["riad"]))
    for src, ctrls in summary.get("controls", {}).items():
        lines += [_row(cl, f"{CONTROL_NAMES.get(c, c)} ({src})", f"{src}/{c}", m) for c, m in ctrls.items()]
    return lines


def _difference_lines(summary: dict[str, Any]) -> list[str]:
    """The clustered differences a reader checks first: vs the best prior-only control, vs ground truth."""
    from evaluation.controls import CONTROL_NAMES
    from evaluation.intervals import find_difference
    from pipeline import registry

    cl, gt, lines = summary.get("clustered", {}), registry.ground_truth(), []
    for src, ctrl in cl.get("best_control", {}).items():
        d = find_difference(cl, f"{src}/msgmsd", ctrl, "i_auroc")
        if d:
            p = d["pooled"]
            lines.append(
                f"  {src} priors: LoRIS+MSGMSD minus {CONTROL_NAMES.get(ctrl.split('/')[1], ctrl)}: "
                f"ΔI-AUROC {100 * p['estimate']:+.1f} pts{_ci(p, 100, '+.1f')}"
            )
    for src in summary.get("priors", {}):
        d = find_difference(cl, f"{src}/msgmsd", f"{gt}/msgmsd", "i_auroc") if src != gt else None
        if d:
            p = d["pooled"]
            lines.append(
                f"  {src} priors vs {gt}: LoRIS+MSGMSD ΔI-AUROC {100 * p['estimate']:+.1f} pts"
                f"{_ci(p, 100, '+.1f')} (clustered)"
            )
    return lines


def _comparison_lines(summary: dict[str, Any]) -> list[str]:
    """The per-image DeLong comparisons of each prior with its reference, here and on held-out sets."""
    lines = []
    for where, comparisons in [("", summary.get("prior_comparison", {}))] + [
        (f" [external {e['data']}: {e.get('images')} images]", e.get("prior_comparison", {}))
        for e in summary.get("external", [])
    ]:
        for prior, c in comparisons.items():
            lines.append(
                f"  {prior} priors vs {c['reference']}{where}: LoRIS+{c['method'].upper()} I-AUROC "
                f"{c['auroc_b']:.3f} vs {c['auroc_a']:.3f}, Δ {100 * c['diff']:+.1f} pts (95% CI "
                f"{100 * c['ci_low']:+.1f} to {100 * c['ci_high']:+.1f}, per-image DeLong, "
                f"{len(c['folds'])} folds)"
            )
    return lines


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    """The closing lines: each method and control with its patient-clustered 95% interval, and the
    paired differences a reader checks first (vs the best prior-only control, vs ground-truth priors)."""
    head = (
        f"results in {out} (report.html, table1.md, table2.md, summary.json); "
        f"[95% patient-clustered bootstrap intervals]"
    )
    print("\n".join([head, *_method_lines(summary), *_difference_lines(summary), *_comparison_lines(summary)]))
