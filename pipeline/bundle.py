"""A deployable LoRIS model: detector + U-Net + thresholds chosen on validation (``train``/``predict``).

The bundle folder holds ``bundle.json`` (thresholds, prior policy, config, versions),
``detector/`` and ``unet/``. Nothing in it is a pickle: weights load with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from detectors.base import Detector, detector_class
from detectors.prior import PriorPolicy
from detectors.refine import RefinedDetector
from evaluation.metrics import image_auroc, select_threshold
from pipeline import stages
from pipeline.data import load_data
from pipeline.outputs import write_json
from pipeline.provenance import git_commit, package_versions
from scans.folds import make_folds

BUNDLE_FORMAT = 1


def operating_threshold(
    scores: np.ndarray, labels: np.ndarray, point: str = "youden", sensitivity: float = 0.9
) -> tuple[float, dict[str, float]]:
    """Image-score threshold on validation: Youden's J, or the highest one reaching ``sensitivity``.

    >>> operating_threshold(np.array([0.1, 0.2, 0.6, 0.9]), np.array([0, 0, 1, 1]))[0]
    0.6
    """
    fpr, tpr, thr = roc_curve(labels, scores)
    if point == "youden":
        i = int(np.argmax(tpr - fpr))
    elif point == "sensitivity":
        reach = np.flatnonzero(tpr >= sensitivity)
        i = int(reach[0])
    else:
        raise ValueError(f"bundle.operating_point must be youden or sensitivity, not {point!r}")
    t = float(thr[i]) if np.isfinite(thr[i]) else float(np.max(scores))
    return t, {"sensitivity": float(tpr[i]), "specificity": float(1 - fpr[i])}


def train_bundle(cfg: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """Train one deployable model on all the data, with a patient-grouped validation part."""
    from reconstruction.checkpoint import save_model
    from reconstruction.deviation import image_score
    from reconstruction.infer import reconstruct

    name = cfg["detector"]["name"]
    if name == "gt":
        raise ValueError("a deployable bundle needs a detector for new scans: use --detector yolov5 or codetr")
    model_dir = Path(model_dir)
    if (model_dir / "bundle.json").exists():
        raise FileExistsError(f"{model_dir} already holds a bundle; choose another --out")
    stages.set_threads(cfg)
    data = load_data(cfg)
    val_ids = make_folds(data.scans, k=5, seed=cfg["seed"])[0].test  # a patient-grouped ~20%
    val_set = set(val_ids)
    train_ids = tuple(s.id for s in data.scans if s.id not in val_set)
    tr, va = data.index(train_ids), data.index(val_ids)
    arr = data.arrays
    det, det_info = stages.fit_detector(cfg, data, tr, va, model_dir / "work" / "detector")
    unet, unet_info = stages.fit_unet(cfg, data, tr, va, "single")
    size = arr.images.shape[-1]
    policy = PriorPolicy(
        float(cfg["detector"]["threshold"]),
        PriorPolicy.median_of(arr.boxes[stages.training_subset(arr, tr, cfg["detector"]["train_classes"])], size, size),
    )
    val = arr.subset(va)
    pv = stages.predict_priors(cfg, det, val, policy)
    b = cfg["bundle"]
    maps = tuple(dict.fromkeys([b["score_map"], b["segment_map"]]))
    rv = reconstruct(
        unet,
        val.images,
        pv.boxes,
        maps=maps,
        device=stages.resolve_device(cfg),
        margin=float(cfg["unet"]["mask_margin"]),
    )
    s = cfg["score"]
    scores = image_score(
        rv.maps[b["score_map"]],
        pv.boxes,
        pooling=s["pooling"],
        region=s["region"],
        topk_fraction=s["topk_fraction"],
        margin=float(cfg["unet"]["mask_margin"]),
    )
    thr, op = operating_threshold(scores, val.labels, b["operating_point"], float(b["sensitivity"]))
    seg = select_threshold(rv.maps[b["segment_map"]], val.masks, kernel=int(cfg["evaluation"]["postprocess_kernel"]))
    det.save(model_dir / "detector")
    save_model(unet, model_dir / "unet", meta={k: v for k, v in unet_info.items() if k != "cache"})
    doc = {
        "format": BUNDLE_FORMAT,
        "detector": name,
        "image_size": size,
        "maps": list(maps),
        "frame": int(cfg.get("frame", 0)),
        "mask_margin": float(cfg["unet"]["mask_margin"]),
        "score": {
            "map": b["score_map"],
            "threshold": thr,
            "operating_point": b["operating_point"],
            "pooling": s["pooling"],
            "region": s["region"],
            "topk_fraction": s["topk_fraction"],
            "validation": {
                **op,
                "i_auroc": image_auroc(scores, val.labels),
                "n": int(len(va)),
                "n_distended": int(val.labels.sum()),
            },
        },
        "segmentation": {
            "map": b["segment_map"],
            "threshold": seg.threshold,
            "validation_dice": seg.dice,
            "kernel": int(cfg["evaluation"]["postprocess_kernel"]),
        },
        "prior": {
            "threshold": policy.threshold,
            "median_box": list(policy.median_box),
            "expand_up": cfg["detector"]["expand_up"],
            "expand_side": cfg["detector"]["expand_side"],
        },
        "train": {"n_train": len(tr), "n_val": len(va), "detector": det_info, "unet": unet_info},
        "config": cfg,
        "versions": package_versions(),
        "commit": git_commit(),
    }
    write_json(model_dir / "bundle.json", doc)
    return doc


@dataclass
class BundleOutput:
    scores: np.ndarray  # [N]
    boxes: np.ndarray  # [N, 4] in model pixels
    sources: list[str]
    confidences: np.ndarray
    masks: np.ndarray  # [N, S, S] bool
    heat: np.ndarray  # [N, S, S] the segmentation map


class Bundle:
    """A trained bundle ready for :meth:`process`."""

    def __init__(self, doc: dict[str, Any], detector: Detector, unet: Any, device: str) -> None:
        self.doc, self.detector, self.unet, self.device = doc, detector, unet, device
        self.image_size = int(doc["image_size"])
        self.frame = int(doc.get("frame", 0))
        self.score_threshold = float(doc["score"]["threshold"])
        p = doc["prior"]
        self.policy = PriorPolicy(float(p["threshold"]), tuple(p["median_box"]))  # type: ignore[arg-type]
        self.cfg = {"detector": {"expand_up": p["expand_up"], "expand_side": p["expand_side"]}}

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> Bundle:
        from reconstruction.checkpoint import load_model

        directory = Path(directory)
        path = directory / "bundle.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a LoRIS bundle (no bundle.json); create one with `train`")
        doc = json.loads(path.read_text())
        if doc.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{path}: bundle format {doc.get('format')} is not supported (expected {BUNDLE_FORMAT})")
        dev = stages.resolve_device({"device": device})
        det_dir = directory / "detector"
        # A refined detector (base + box refiner) says so in refined.json beside the base's files.
        # The bundle uses only the prior (the top box), so only that box is refined.
        detector = (
            RefinedDetector.load(det_dir, top_k=1)
            if (det_dir / "refined.json").is_file()
            else detector_class(doc["detector"]).load(det_dir)
        )
        unet, _ = load_model(directory / "unet", map_location=dev)
        return cls(doc, detector, unet, dev)

    def process(self, images: np.ndarray) -> BundleOutput:
        """Detect, reconstruct, score and segment a ``[N, S, S]`` batch in [0, 1]."""
        from reconstruction.deviation import image_score
        from reconstruction.infer import reconstruct
        from reconstruction.segment import segment
        from scans.records import ScanArrays

        n = len(images)
        arrays = ScanArrays(
            images=images,
            boxes=np.full((n, 4), np.nan, np.float32),
            masks=np.zeros(images.shape, bool),
            labels=-np.ones(n, np.int64),
            ids=np.arange(n),
            patients=[""] * n,
            scale=np.ones((n, 2), np.float32),
        )
        pri = stages.predict_priors(self.cfg, self.detector, arrays, self.policy, batch_size=max(n, 1))
        d = self.doc
        rec = reconstruct(
            self.unet,
            images,
            pri.boxes,
            maps=tuple(d["maps"]),
            device=self.device,
            margin=float(d.get("mask_margin", 0.0)),
        )
        s = d["score"]
        scores = image_score(
            rec.maps[s["map"]],
            pri.boxes,
            pooling=s["pooling"],
            region=s["region"],
            topk_fraction=s["topk_fraction"],
            margin=float(d.get("mask_margin", 0.0)),
        )
        g = d["segmentation"]
        heat = rec.maps[g["map"]]
        masks = segment(heat, float(g["threshold"]), kernel=int(g["kernel"]))
        return BundleOutput(scores, pri.boxes, pri.sources, pri.confidences, masks, heat)
