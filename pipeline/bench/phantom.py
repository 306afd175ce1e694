"""Phantom generation speed on one core: ``python -m pipeline.bench.phantom [--size 256] [--images 40] [--repeats 5]``.

Times the full per-image work of :func:`scans.phantom.generate_dataset` (render, 8-bit PNG
encoding, RLE of the mask) and prints images/s from the median time over the repeats.
``--boxes SEED [SEED ...]`` instead prints, for the default phantom of each seed, the I-AUROC of
the annotated box's height, width and area alone (no image; chance is 0.5) and the patient
spread of the distended images, from the geometry only (seconds).

>>> main(["--size", "64", "--images", "2", "--repeats", "1"]) == 0  # doctest: +ELLIPSIS
phantom ... images/s ...
True
"""

from __future__ import annotations

import argparse
import os

from runtime.env import setup_environment

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _make_images(size: int, n_images: int, seed: int = 0) -> None:
    """Render, PNG-encode and RLE-encode ``n_images`` images (a third distended)."""
    import cv2
    import numpy as np

    from scans.phantom import render_scan, sample_anatomy
    from scans.rle import encode_mask

    anatomies = [sample_anatomy(np.random.default_rng([seed, 0, p])) for p in range(8)]
    for i in range(n_images):
        rng = np.random.default_rng([seed, 1, i])
        r = render_scan(rng, anatomies[i % 8], 0.5 if i % 3 == 0 else 0.0, size)
        cv2.imencode(".png", np.round(r.image * 255.0).astype(np.uint8))
        encode_mask(r.pocket if i % 3 == 0 else r.recess)


def images_per_second(size: int, n_images: int, repeats: int = 1, seed: int = 0) -> float:
    """Images/s of render + PNG encode + RLE, from the median time of ``repeats`` batches of ``n_images``."""
    from runtime.timing import median_seconds

    return n_images / median_seconds(lambda: _make_images(size, n_images, seed), repeats=repeats, warmup=0)


def box_report(
    seed: int, n_images: int = 483, n_distended: int = 123, n_patients: int = 60, size: int = 256
) -> dict[str, float]:
    """Box-size-only AUROCs, mean box heights and the patient spread of one phantom (geometry only)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from scans.phantom import dataset_geometry

    patient, distended, geoms = dataset_geometry(n_images, n_distended, n_patients, size, seed)
    b = np.array([g.box for g in geoms])
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    per = np.bincount(patient[distended], minlength=n_patients)
    kept = sum(int(g.pocket.sum()) for g, d in zip(geoms, distended) if d)
    lost = sum(g.pocket_outside for g, d in zip(geoms, distended) if d)
    return {
        "auroc_height": roc_auc_score(distended, h),
        "auroc_width": roc_auc_score(distended, w),
        "auroc_area": roc_auc_score(distended, h * w),
        "height_normal": float(h[~distended].mean()),
        "height_distended": float(h[distended].mean()),
        "patients_distended": int((per > 0).sum()),
        "max_per_patient": int(per.max()),
        "pocket_clipped": lost / max(kept + lost, 1),
    }


def main(argv: list[str] | None = None) -> int:
    setup_environment()
    # One core: pin the thread pools before numpy/OpenCV start them (run as a command, nothing has yet).
    for variable in THREAD_VARIABLES:
        os.environ.setdefault(variable, "1")
    import cv2

    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.phantom", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--boxes", type=int, nargs="+", metavar="SEED", help="box-size AUROCs of these seeds' phantoms")
    args = parser.parse_args(argv)
    if args.boxes:
        for seed in args.boxes:
            r = box_report(seed, size=args.size)
            print(
                f"seed {seed}: "
                + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
            )
        return 0
    cv2.setNumThreads(1)
    _make_images(args.size, 2)  # warm-up (imports, allocator)
    rate = images_per_second(args.size, args.images, args.repeats)
    print(f"phantom size={args.size}: {rate:.1f} images/s (median time of {args.repeats} repeats; one thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
