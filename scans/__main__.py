"""``python -m scans check DIR`` validates a dataset; ``python -m scans phantom`` writes one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scans", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="validate a dataset folder and list every problem")
    chk.add_argument("dir", type=Path)
    ph = sub.add_parser("phantom", help="write a synthetic knee-ultrasound dataset")
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
    args = parser.parse_args(argv)

    from scans.check import check_dataset, summary_line

    if args.command == "phantom":
        from scans.phantom import generate_dataset

        out = generate_dataset(
            args.out,
            n_images=args.images,
            n_distended=args.distended,
            n_patients=args.patients,
            size=args.size,
            seed=args.seed,
            null=args.null,
        )
        args.dir = out
        print(f"wrote {out}")
    problems = check_dataset(args.dir)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(summary_line(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
