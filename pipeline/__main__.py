"""``python -m pipeline run|ablate|compare|aggregate|train|predict|merge|bench|export`` (also installed as ``loris``).

Each subcommand has a small parser function (``_<name>_parser``) and a handler in ``_dispatch``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Config


def _common(p: argparse.ArgumentParser) -> None:
    from pipeline.config import PROFILES

    p.add_argument("--data", type=Path, help="dataset folder (README 'Your own data'); default: the embedded phantom")
    p.add_argument("--config", type=Path, help="YAML file overriding configs/default.yaml")
    p.add_argument("--profile", choices=PROFILES, default="default")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (dotted, e.g. unet.epochs=5); repeatable, applied last",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _config(args: argparse.Namespace, detector: str) -> Config:
    """The typed config: files and ``--set``, then the command's own options (``--data``, ``--external``, ...)."""
    from pipeline.config import load_config

    flags: dict[str, Any] = {}
    if args.data is not None:
        flags["data"] = str(args.data)
    if getattr(args, "external", None):
        paths = [str(p) for p in args.external]
        flags["evaluation"] = {"external": paths[0] if len(paths) == 1 else paths}
    if getattr(args, "folds", None):
        flags["run_folds"] = [int(v) for v in args.folds.split(",")]
    if getattr(args, "sensitivity", None) is not None:
        flags["bundle"] = {"operating_point": "sensitivity", "sensitivity": args.sensitivity}
    cfg = load_config(args.config, args.profile, [f"detector.name={detector}", *args.overrides], flags)
    return replace(cfg, progress=not args.no_progress)


def _cv_parsers(sub: Any) -> None:
    """``run`` and ``ablate``: choices and defaults from the detector registry."""
    from pipeline import registry

    names = registry.names()
    run = sub.add_parser("run", help="cross-validate LoRIS with one prior source (Table 1)")
    run.add_argument("--detector", choices=names, default=registry.ground_truth())
    run.add_argument("--folds", type=_fold_list, help="comma-separated fold indices, e.g. 0,2 (default: all)")
    run.add_argument("--out", type=Path, help="run folder (default: runs/<command>-<detector>-<profile>-<time>)")
    _common(run)
    abl = sub.add_parser("ablate", help="ground-truth against predicted priors, sharing the U-Nets (Table 2)")
    abl.add_argument(
        "--detectors", default=",".join(names), help=f"comma-separated prior sources from {', '.join(names)}"
    )
    abl.add_argument("--folds", type=_fold_list, help="comma-separated fold indices (default: all)")
    abl.add_argument("--out", type=Path)
    _common(abl)
    for p in (run, abl):
        p.add_argument(
            "--external",
            type=Path,
            action="append",
            help="held-out dataset folder: also evaluate "
            "every fold's models on all of it (reported under <out>/external/); repeatable, one "
            "report per set under <out>/external/<name>/",
        )


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_workers = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _unit_fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], not {text}")
    return value


def _fold_list(text: str) -> str:
    """An argparse type: comma-separated fold indices (0 or more), kept as text for the config."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers such as 0,2, not {text!r}")
    return ",".join(parts)


def _frames(text: str) -> str | int:
    from pipeline.serve.predict.driver import parse_frames

    try:
        value = parse_frames(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert value is not None
    return value


def _shard(text: str) -> tuple[int, int]:
    from pipeline.serve.predict.driver import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dicom_kinds(text: str) -> tuple[str, ...]:
    from pipeline.serve.dicom_out import KINDS

    kinds = tuple(dict.fromkeys(k.strip().lower() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(KINDS)}, not {text!r}")
    return kinds


def _train_parser(sub: Any) -> None:
    from pipeline import registry

    trainable = registry.trainable()
    tr = sub.add_parser("train", help="train one deployable bundle on all the data")
    tr.add_argument("--detector", choices=trainable, default=trainable[0], help=f"default: {trainable[0]}")
    tr.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    tr.add_argument(
        "--sensitivity",
        type=_unit_fraction,
        help="pick the score threshold reaching this validation sensitivity (in (0, 1]) instead of Youden's J",
    )
    _common(tr)


def _predict_parser(sub: Any) -> None:
    from scans.readers import CROP_MODES

    pr = sub.add_parser("predict", help="score and segment every scan in a folder with a trained bundle")
    pr.add_argument("--model", type=Path, required=True, help="bundle folder written by `train`")
    pr.add_argument("--input", type=Path, required=True, help="folder of scans (PNG/JPEG/BMP/TIFF/DICOM)")
    pr.add_argument("--out", type=Path, help="output folder, outside --input (default: runs/predict-<time>)")
    pr.add_argument("--recursive", action="store_true", help="also process sub-folders")
    pr.add_argument("--batch-size", type=_positive_int, default=16)
    pr.add_argument("--device", default="auto")
    pr.add_argument(
        "--crop",
        choices=CROP_MODES,
        default="regions",
        help="regions: crop DICOMs to their ultrasound B-mode region when they have one (default); "
        "auto: also find the region from the pixels when they have none; none: never crop",
    )
    pr.add_argument("--region", type=int, help="index into the Sequence of Ultrasound Regions (default: largest)")
    pr.add_argument(
        "--frames",
        type=_frames,
        help="cine DICOMs: first, all (one row per frame) or a frame number (default: the bundle's frame)",
    )
    pr.add_argument(
        "--max-megapixels",
        type=_positive_float,
        default=50.0,
        help="images with more pixels per frame are refused from their header, before decoding (default: 50)",
    )
    pr.add_argument(
        "--dicom-out",
        type=_dicom_kinds,
        nargs="?",
        const=("seg", "sr"),
        default=(),
        metavar="seg,sr,sc",
        help="also write DICOM results of DICOM inputs under OUT/dicom/ (bare flag: seg,sr); "
        "they carry the patient and study tags that file them in a PACS",
    )
    pr.add_argument("--no-review", action="store_true", help="do not write the review page")
    pr.add_argument(
        "--overlays",
        action="store_true",
        help="also write OUT/overlays/<name>.png (scan, heat map, mask contour, box); default: none, the "
        "masks are in predictions.csv's mask_rle column",
    )
    pr.add_argument(
        "--shard",
        type=_shard,
        metavar="K/N",
        help="process only the files whose path hash is K modulo N (e.g. 0/4), each shard into its own "
        "--out; join the folders with `merge`",
    )
    pr.add_argument(
        "--workers",
        type=_workers,
        help="processes decoding scans while the model runs (local and onnxruntime engines; 0: in this "
        "process; default: 2 with more than 2 cores, else 0)",
    )
    pr.add_argument(
        "--prefetch", type=_positive_int, default=2, help="frames each --workers process reads ahead (default: 2)"
    )
    pr.add_argument(
        "--engine",
        choices=["local", "ray", "onnxruntime"],
        default="local",
        help="local: this process (default); ray: Ray Data with --actors model-holding actors (needs ray[data]); "
        "onnxruntime: this process, the bundle run by ONNX Runtime",
    )
    pr.add_argument("--actors", type=_positive_int, default=1, help="--engine ray: actors, each holding the model")
    pr.add_argument("--ray-address", help="--engine ray: an existing Ray cluster (default: start one on this machine)")
    pr.add_argument("--no-progress", action="store_true")


def _merge_parser(sub: Any) -> None:
    me = sub.add_parser("merge", help="join the output folders of `predict --shard K/N` runs into one")
    me.add_argument("shards", type=Path, nargs="+", metavar="SHARD_OUT", help="predict output folders")
    me.add_argument("--out", type=Path, required=True, help="folder for the merged results (new or empty)")
    me.add_argument("--move", action="store_true", help="move the overlay and DICOM files instead of copying them")


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


def _export_parser(sub: Any) -> None:
    ex = sub.add_parser("export", help="export a trained bundle to ONNX for CPU deployment")
    ex.add_argument("--model", type=Path, required=True, help="bundle folder written by `train`")
    ex.add_argument("--out", type=Path, required=True, help="folder for the .onnx files and export.json")
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--no-detector", action="store_true", help="export the U-Net and the LoRIS graph only")


def _model_parsers(sub: Any) -> None:
    """``train``, ``predict``, ``merge``, ``bench`` and ``export``."""
    for add in (_train_parser, _predict_parser, _merge_parser, _bench_parser, _export_parser):
        add(sub)


def build_parser() -> argparse.ArgumentParser:
    """The ``loris`` command line; detector choices come from the registry (:mod:`pipeline.registry`)."""
    parser = argparse.ArgumentParser(
        prog="loris",
        description="LoRIS: localized reconstruction-by-inpainting for knee recess distension in ultrasound",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _cv_parsers(sub)
    _compare_parser(sub)
    _aggregate_parser(sub)
    _model_parsers(sub)
    return parser


def _compare_parser(sub: Any) -> None:
    """``compare``: LoRIS beside RIAD and the Table 1 peers on the same folds."""
    from pipeline.experiment.compare import add_arguments

    cmp = sub.add_parser("compare", help="LoRIS, RIAD and the Table 1 peers on the same folds (Table 1 in full)")
    add_arguments(cmp)  # --methods, --detector, --folds, --out, --external
    _common(cmp)


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


def main(argv: list[str] | None = None) -> int:
    from runtime.env import CacheHomeError, setup_environment

    try:  # before anything imports torch, matplotlib or ultralytics: they read these variables when loaded
        setup_environment(check_cache=True, cli_defaults=True)
    except CacheHomeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        if os.environ.get("LORIS_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _cross_validate(args: argparse.Namespace) -> int:
    from pipeline.experiment.run import execute
    from pipeline.run_dirs import default_run_dir

    names = [args.detector] if args.command == "run" else [d.strip() for d in args.detectors.split(",") if d.strip()]
    if not names:
        raise ValueError("--detectors: name at least one prior source")
    cfg = _config(args, names[0])
    out = Path(args.out) if args.out else default_run_dir(cfg, args.command)
    summary = execute(cfg, out, names, command=args.command)
    from runtime.distributed import is_main

    if is_main():  # under torchrun every rank returns the summary; one prints it
        _print_summary(summary, out)
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipeline.serve.bundle import train_bundle
    from runtime.distributed import is_main

    doc = train_bundle(_config(args, args.detector), args.out)
    if not is_main():
        return 0
    v = doc["score"]["validation"]
    print(
        f"bundle written to {args.out}: score threshold {doc['score']['threshold']:.4g} "
        f"({doc['score']['operating_point']}: validation sensitivity {v['sensitivity']:.2f}, "
        f"specificity {v['specificity']:.2f}, I-AUROC {v['i_auroc']:.3f}); "
        f"segmentation threshold {doc['segmentation']['threshold']:.4g}"
        + (
            f"; UNFIT FOR USE: {len(doc['warnings'])} warning(s) above and in bundle.json"
            if doc.get("warnings")
            else ""
        )
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    import time

    from pipeline.serve.predict.driver import ReadOptions

    out = args.out or Path("runs") / f"predict-{time.strftime('%Y%m%d-%H%M%S')}"
    read = ReadOptions(
        crop=args.crop, region=args.region, frames=args.frames, max_pixels=int(args.max_megapixels * 1e6)
    )
    common: dict[str, Any] = {
        "recursive": args.recursive,
        "batch_size": args.batch_size,
        "device": args.device,
        "progress": not args.no_progress,
        "read": read,
        "dicom_out": args.dicom_out,
        "review": not args.no_review,
        "overlays": args.overlays,
        "shard": args.shard,
        "workers": args.workers,
        "prefetch": args.prefetch,
        "runtime": "onnxruntime" if args.engine == "onnxruntime" else "torch",
    }
    if args.engine == "ray":
        import importlib.util

        if not all(importlib.util.find_spec(m) for m in ("ray", "pyarrow")):
            raise RuntimeError("--engine ray needs Ray Data: pip install 'ray[data]'")
        from pipeline.serve.predict.ray_engine import RayEngine

        common["engine"] = RayEngine(args.actors, address=args.ray_address)
    from pipeline.serve.predict.driver import predict_folder

    stats = predict_folder(args.model, args.input, out, **common)
    outputs = ["predictions.csv (masks as mask_rle)", "errors.csv", "predict.json"]
    outputs += ["overlays/"] * args.overlays + ["dicom/"] * bool(args.dicom_out)
    outputs += [stats["review"].name] if stats.get("review") else []
    shard = f" for shard {args.shard[0]}/{args.shard[1]}" if args.shard else ""
    print(f"results{shard} in {out} ({', '.join(outputs)})")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from pipeline.serve.predict.driver import merge_outputs

    info = merge_outputs(args.shards, args.out, move=args.move)
    n, have, lacking = info["n"], info["shards"], info["missing_shards"]
    print(
        f"merged {len(args.shards)} folder(s) into {args.out}: {info['predictions']} prediction row(s), "
        f"{info['errors']} error row(s), {info['files']} file(s) {'moved' if args.move else 'copied'}; "
        f"shards {','.join(map(str, have))} of {n}"
        + (f" (missing: {','.join(map(str, lacking))})" if lacking else "")
        + (f"; {info['missing_files']} listed file(s) not found" if info["missing_files"] else "")
    )
    print(f"review page: {info['review']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.serve.onnx_export import export_bundle
    from pipeline.serve.predict.driver import output_lock

    with output_lock(args.out):  # one export at a time into a folder
        info = export_bundle(args.model, args.out, detector=not args.no_detector)
    files = [v["file"] for v in (info["unet"], info["loris"], info["detector"]) if v.get("file")]
    note = info["detector"].get("note")
    print(f"exported {', '.join(files)} to {args.out} (export.json)" + (f"; detector: {note}" if note else ""))
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


def _compare(args: argparse.Namespace) -> int:
    from pipeline.experiment.compare import cli, parse_methods

    parse_methods(args.methods)  # refuse a bad method name before anything loads
    return cli(args, _config(args, args.detector))


def _aggregate(args: argparse.Namespace) -> int:
    from pipeline.experiment.aggregate import aggregate_runs

    _print_summary(aggregate_runs(args.runs, args.out, args.mixed_runtime), args.out)
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    commands = {
        "run": _cross_validate,
        "ablate": _cross_validate,
        "train": _train,
        "predict": _predict,
        "merge": _merge,
        "bench": _bench,
        "export": _export,
        "compare": _compare,
        "aggregate": _aggregate,
    }
    return commands[args.command](args)


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


if __name__ == "__main__":
    sys.exit(main())
