"""``python -m scans check DIR`` validates a dataset; ``python -m scans phantom`` writes one;
``python -m scans import --from FORMAT SRC --out DIR`` converts other tools' annotations into one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from runtime.env import setup_environment

    setup_environment()
    args = _parser().parse_args(argv)

    from scans.check import check_dataset, summary_line

    if args.command == "import":
        return _import(args)

    if args.command == "phantom":
        out = _phantom(args)
        if out is None:
            return 2
        args.dir = out
    problems = check_dataset(args.dir)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(summary_line(args.dir))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scans", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="validate a dataset folder and list every problem")
    chk.add_argument("dir", type=Path)
    _phantom_parser(sub.add_parser("phantom", help="write a synthetic knee-ultrasound dataset"))
    _import_parser(sub)
    return parser


def _phantom_parser(ph: argparse.ArgumentParser) -> None:
    ph.add_argument("--out", type=Path, required=True)
    ph.add_argument("--images", type=int, default=483)
    ph.add_argument("--distended", type=int, default=123)
    ph.add_argument("--patients", type=int, default=60)
    ph.add_argument("--size", type=int, default=256)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument(
        "--null",
        action="store_true",
        help="negative control: distended scans keep their label and pocket mask but are rendered without the pocket",
    )
    ph.add_argument(
        "--appearance",
        choices=("anechoic", "echogenic", "mixed"),
        default="anechoic",
        help="what fills the pockets: anechoic fluid (default, phantom v4), echogenic blood, or fluid with clots "
        "and synovial thickening (scans/phantom.py APPEARANCES)",
    )
    ph.add_argument(
        "--twins",
        action="store_true",
        help="also write twins/: each image's pocket-free twin with fresh speckle (the ideal inpainter); "
        "when --out already holds this seed's phantom, write only its twins",
    )


def _import_parser(sub: Any) -> None:
    from scans.importers import FORMATS

    imp = sub.add_parser(
        "import",
        help="convert YOLO, Pascal VOC, LabelMe, CVAT or CSV annotations into a dataset folder",
        description="Writes DIR (images/, annotations.json, splits.json when the source has splits) atomically, "
        "or refuses listing every missing or ambiguous item per file, writing nothing.",
    )
    imp.add_argument("--from", dest="fmt", required=True, choices=sorted(FORMATS), help="source format")
    imp.add_argument("src", type=Path, help="source folder (or file, for csv and cvat)")
    imp.add_argument("--out", type=Path, required=True, help="new dataset folder (must not exist or be empty)")
    imp.add_argument("--meta", type=Path, help="CSV with columns file,patient,distended")
    imp.add_argument(
        "--patient-pattern",
        help="regex searched in each file's base name, with a group (?P<patient>...) "
        "and optionally (?P<distended>...) (yes/no, true/false, 1/0, distended/normal)",
    )
    imp.add_argument("--label", help="the source label of the recess box, when the source has several")
    imp.add_argument("--masks", type=Path, help="folder of mask PNGs named like the images (for box-only formats)")


def _phantom(args: argparse.Namespace) -> Path | None:
    """``phantom``: the dataset written (or the twins added to it), else None once the error is printed."""
    from scans.phantom import check_arguments, generate_dataset, write_twins

    try:  # a bad option or --out is named, without a traceback, before anything renders
        if args.twins and (args.out / "annotations.json").is_file():
            print(f"wrote {write_twins(args.out, args.seed)}")
            out = args.out
        else:
            check_arguments(args.images, args.distended, args.patients, args.size, args.seed)
            out = generate_dataset(
                args.out,
                n_images=args.images,
                n_distended=args.distended,
                n_patients=args.patients,
                size=args.size,
                seed=args.seed,
                null=args.null,
                appearance=args.appearance,
                twins=args.twins,
            )
            print(f"wrote {out}")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return out


def _import(args: argparse.Namespace) -> int:
    from scans.check import summary_line
    from scans.importers import ImportRefused, Options, import_dataset

    options = Options(meta=args.meta, patient_pattern=args.patient_pattern, label=args.label, masks=args.masks)
    try:
        out = import_dataset(args.fmt, args.src, args.out, options)
    except ImportRefused as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        print(f"{args.src}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_line(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
