"""The serving commands of ``loris``: ``train``, ``predict``, ``merge`` and ``export``
(:data:`COMMANDS`, each adding its parser; mounted by :mod:`pipeline.__main__`). The ``predict`` options come from
:class:`pipeline.serve.predict.options.PredictOptions`, so the command line and the driver share one
default per setting. Nothing here imports the experiment side (:mod:`pipeline.experiment`); the heavy
imports wait for the handler, after ``main`` has set the environment up."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.cli_args import add_common_arguments, config_from_args, unit_fraction


def _train_parser(sub: Any) -> None:
    from pipeline import registry

    trainable = registry.trainable()
    tr = sub.add_parser("train", help="train one deployable bundle on all the data")
    tr.add_argument("--detector", choices=trainable, default=trainable[0], help=f"default: {trainable[0]}")
    tr.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    tr.add_argument(
        "--sensitivity",
        type=unit_fraction,
        help="pick the score threshold reaching this validation sensitivity (in (0, 1]) instead of Youden's J",
    )
    add_common_arguments(tr)
    tr.set_defaults(handler=_train)


def _predict_parser(sub: Any) -> None:
    from pipeline.serve.predict.options import PredictOptions

    pr = sub.add_parser("predict", help="score and segment every scan in a folder with a trained bundle")
    pr.add_argument("--model", type=Path, required=True, help="bundle folder written by `train`")
    pr.add_argument("--input", type=Path, required=True, help="folder of scans (PNG/JPEG/BMP/TIFF/DICOM)")
    pr.add_argument("--out", type=Path, help="output folder, outside --input (default: runs/predict-<time>)")
    PredictOptions.add_arguments(pr)
    pr.set_defaults(handler=_predict)


def _merge_parser(sub: Any) -> None:
    me = sub.add_parser("merge", help="join the output folders of `predict --shard K/N` runs into one")
    me.add_argument("shards", type=Path, nargs="+", metavar="SHARD_OUT", help="predict output folders")
    me.add_argument("--out", type=Path, required=True, help="folder for the merged results (new or empty)")
    me.add_argument("--move", action="store_true", help="move the overlay and DICOM files instead of copying them")
    me.set_defaults(handler=_merge)


def _export_parser(sub: Any) -> None:
    ex = sub.add_parser("export", help="export a trained bundle to ONNX for CPU deployment")
    ex.add_argument("--model", type=Path, required=True, help="bundle folder written by `train`")
    ex.add_argument("--out", type=Path, required=True, help="folder for the .onnx files and export.json")
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--no-detector", action="store_true", help="export the U-Net and the LoRIS graph only")
    ex.set_defaults(handler=_export)


COMMANDS: dict[str, Callable[[Any], None]] = {
    "train": _train_parser,
    "predict": _predict_parser,
    "merge": _merge_parser,
    "export": _export_parser,
}


def _train(args: argparse.Namespace) -> int:
    from pipeline.serve.train import train_bundle
    from runtime.distributed import is_main

    doc = train_bundle(config_from_args(args, args.detector), args.out)
    if not is_main():
        return 0
    v = doc.score.validation or {}
    print(
        f"bundle written to {args.out}: score threshold {doc.score.threshold:.4g} "
        f"({doc.score.operating_point}: validation sensitivity {v['sensitivity']:.2f}, "
        f"specificity {v['specificity']:.2f}, I-AUROC {v['i_auroc']:.3f}); "
        f"segmentation threshold {doc.segmentation.threshold:.4g}"
        + (f"; UNFIT FOR USE: {len(doc.warnings)} warning(s) above and in bundle.json" if doc.warnings else "")
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    import time

    from pipeline.serve.predict import PredictOptions, predict_folder

    out = args.out or Path("runs") / f"predict-{time.strftime('%Y%m%d-%H%M%S')}"
    stats = predict_folder(args.model, args.input, out, PredictOptions.from_args(args))
    outputs = ["predictions.csv (masks as mask_rle)", "errors.csv", "predict.json"]
    outputs += ["overlays/"] * args.overlays + ["dicom/"] * bool(args.dicom_out)
    outputs += [stats["review"].name] if stats.get("review") else []
    shard = f" for shard {args.shard[0]}/{args.shard[1]}" if args.shard else ""
    print(f"results{shard} in {out} ({', '.join(outputs)})")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from pipeline.serve.merge import merge_outputs

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
    from pipeline.serve.predict.manifest import output_lock

    with output_lock(args.out):  # one export at a time into a folder
        info = export_bundle(args.model, args.out, detector=not args.no_detector)
    files = [v["file"] for v in (info["unet"], info["loris"], info["detector"]) if v.get("file")]
    note = info["detector"].get("note")
    print(f"exported {', '.join(files)} to {args.out} (export.json)" + (f"; detector: {note}" if note else ""))
    return 0
