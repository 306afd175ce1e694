"""A deployable LoRIS model: detector + U-Net + thresholds chosen on validation (``train``/``predict``).

The bundle folder holds ``bundle.json`` (thresholds, the score's calibration, prior policy, config,
versions), ``detector/`` and ``unet/``. Nothing in it is a pickle: weights load with ``weights_only=True``.

The verdict is the image score against ``score.threshold``; ``calibration`` (:func:`fit_calibration`,
fitted on the same validation part) turns the score into the probability of distension that
``predict`` writes beside it (:func:`calibrate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_curve

from detectors.base import Detector, detector_class
from detectors.prior import PriorPolicy
from detectors.refine import RefinedDetector
from evaluation.metrics import image_auroc, select_threshold
from pipeline import registry
from pipeline.config import IMAGE_SIZE, Config, known_maps
from pipeline.provenance import git_commit, package_versions
from pipeline.run_dirs import RunDirError, run_lock, write_json
from pipeline.shared.calibration import CALIBRATION_METHODS, calibrate, fit_calibration
from pipeline.shared.data import Data, load_data
from pipeline.shared.models import fit_detector, fit_unet
from pipeline.shared.priors import Expansion, fold_policy, predict_priors
from pipeline.shared.scoring import image_scores
from runtime.device import resolve_device, set_threads
from runtime.distributed import barrier, distributed_session, is_main, main_first
from runtime.io import CheckpointError, load_meta
from scans.folds import make_folds
from scans.records import ScanArrays

BUNDLE_FORMAT = 1
# Below these on the validation part a bundle is still written, with a warning on stderr and in bundle.json.
MIN_VALIDATION_AUROC = 0.5
MIN_VALIDATION_SENSITIVITY = 0.5


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


def _validation_split(data: Data, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices: a patient-grouped ~20% held out for the thresholds."""
    val_ids = make_folds(data.scans, k=5, seed=seed)[0].test
    val_set = set(val_ids)
    train_ids = tuple(s.id for s in data.scans if s.id not in val_set)
    return data.index(train_ids), data.index(val_ids)


def train_bundle(cfg: Config, model_dir: Path) -> dict[str, Any]:
    """Train one deployable model on all the data, with a patient-grouped validation part (under torchrun,
    every rank trains and rank 0 writes)."""
    if detector_class(cfg.detector.name).ground_truth:
        raise ValueError(
            "a deployable bundle needs a detector for new scans: use --detector " + " or ".join(registry.trainable())
        )
    model_dir = Path(model_dir)
    check_bundle_out(model_dir)
    with distributed_session(cfg.device):  # a no-op without torchrun
        # rank 0 holds <out>/.lock while it trains and writes (as `run` does its run folder): a second
        # `train --out` into the same folder refuses at once, before it loads, trains or writes anything
        with run_lock(model_dir, check_bundle_out) if is_main() else contextlib.nullcontext():
            set_threads(cfg.threads)
            data = main_first(lambda: load_data(cfg))
            tr, va = _validation_split(data, cfg.seed)
            det, det_info = fit_detector(cfg, data, tr, va, model_dir / "work" / "detector")  # every rank
            unet, unet_info = fit_unet(cfg, data, tr, va, "single")
            if is_main():
                _write_bundle(cfg, model_dir, data, (tr, va), (det, det_info), (unet, unet_info))
            barrier()
            doc = load_meta(model_dir / "bundle.json")
    return doc


def check_bundle_out(out: Path) -> None:
    """Refuse a ``train --out`` that is a file, already holds a bundle or is a run folder."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is an existing file, not a folder; choose another --out")
    if (out / "bundle.json").exists():
        raise FileExistsError(f"{out} already holds a bundle; choose another --out")
    if (out / "config.yaml").is_file() or (out / "summary.json").exists():
        raise RunDirError(f"{out} is a LoRIS run folder, not a bundle folder; choose another --out")


def bundle_warnings(validation: dict[str, Any]) -> list[str]:
    """Why a bundle is unfit for use, from its validation figures: an I-AUROC below chance or undefined,
    or a sensitivity below one half at its operating point.

    >>> bundle_warnings({"i_auroc": 0.9, "sensitivity": 0.8})
    []
    >>> len(bundle_warnings({"i_auroc": 0.119, "sensitivity": 0.0}))
    2
    """
    out = []
    auroc = float(validation.get("i_auroc", math.nan))
    if not auroc >= MIN_VALIDATION_AUROC:  # NaN too: one class only, nothing was measured
        out.append(
            f"validation I-AUROC {auroc:.3f} is below {MIN_VALIDATION_AUROC} (chance): its scores do not rank "
            f"distended scans above normal ones"
        )
    sensitivity = float(validation.get("sensitivity", math.nan))
    if not sensitivity >= MIN_VALIDATION_SENSITIVITY:
        out.append(
            f"validation sensitivity {sensitivity:.2f} at the score threshold is below "
            f"{MIN_VALIDATION_SENSITIVITY}: it would miss most distended scans"
        )
    return out


def _write_bundle(
    cfg: Config, model_dir: Path, data: Data, split: tuple[Any, Any], det: tuple[Detector, dict], unet: tuple[Any, dict]
) -> None:
    """Choose the operating points on the validation part and write the bundle (rank 0)."""
    from reconstruction.checkpoint import save_model

    (tr, va), (detector, det_info), (net, unet_info) = split, det, unet
    d = cfg.detector
    policy = fold_policy(data.arrays, tr, d.threshold, d.train_classes)
    thresholds = _thresholds(cfg, detector, net, policy, data.arrays.subset(va))
    detector.save(model_dir / "detector")
    save_model(net, model_dir / "unet", meta={k: v for k, v in unet_info.items() if k != "cache"})
    doc = bundle_doc(cfg, policy, thresholds)
    doc["warnings"] = bundle_warnings(thresholds.operating)
    cal = thresholds.calibration
    if cal is not None and cal.get("method") != "platt":
        print(
            f"WARNING: no calibration in the bundle written to {model_dir}: {cal.get('reason')}; "
            "predict leaves predictions.csv's probability column empty",
            file=sys.stderr,
        )
    doc["train"] = {"n_train": len(tr), "n_val": len(va), "detector": det_info, "unet": unet_info}
    doc.update(config=cfg.to_dict(), versions=package_versions(), commit=git_commit())
    write_json(model_dir / "bundle.json", doc)
    if doc["warnings"]:
        lines = "\n".join(f"WARNING:   - {w}" for w in doc["warnings"])
        print(
            f"WARNING: the bundle written to {model_dir} is unfit for use (bundle.json 'warnings'):\n{lines}\n"
            f"WARNING: train with more data, epochs or another detector before deploying it",
            file=sys.stderr,
        )


@dataclass(frozen=True)
class Thresholds:
    """The bundle's operating points, chosen on validation scans."""

    score: float
    operating: dict[str, float]  # validation sensitivity, specificity, I-AUROC and counts
    segmentation: float
    dice: float
    calibration: dict[str, Any] | None = None  # fit_calibration's; None: bundle.json has no calibration


def _thresholds(cfg: Config, det: Detector, unet: Any, policy: PriorPolicy, val: ScanArrays) -> Thresholds:
    """Score and segmentation thresholds on the validation scans."""
    from reconstruction.infer import reconstruct

    b = cfg.bundle
    expansion = Expansion(cfg.detector.expand_up, cfg.detector.expand_side)
    pv = predict_priors(det, val, policy, expansion)
    maps = tuple(dict.fromkeys([b.score_map, b.segment_map]))
    margin = cfg.unet.mask_margin
    rv = reconstruct(unet, val.images, pv.boxes, maps=maps, device=resolve_device(cfg.device), margin=margin)
    scores = image_scores({b.score_map: rv.maps[b.score_map]}, pv.boxes, cfg.score, margin)[b.score_map]
    thr, op = operating_threshold(scores, val.labels, b.operating_point, b.sensitivity)
    seg = select_threshold(rv.maps[b.segment_map], val.masks, kernel=cfg.evaluation.postprocess_kernel)
    validation = {**op, "i_auroc": image_auroc(scores, val.labels), "n": len(val), "n_distended": int(val.labels.sum())}
    return Thresholds(thr, validation, seg.threshold, seg.dice, fit_calibration(scores, val.labels))


def bundle_doc(cfg: Config, policy: PriorPolicy, t: Thresholds) -> dict[str, Any]:
    """``bundle.json`` without its training record and provenance."""
    b, s = cfg.bundle, cfg.score
    calibration = {} if t.calibration is None else {"calibration": dict(t.calibration)}
    return {
        "format": BUNDLE_FORMAT,
        "detector": cfg.detector.name,
        "image_size": cfg.image_size,
        "maps": list(dict.fromkeys([b.score_map, b.segment_map])),
        "frame": cfg.frame,
        "mask_margin": cfg.unet.mask_margin,
        "score": {
            "map": b.score_map,
            "threshold": t.score,
            "operating_point": b.operating_point,
            "pooling": s.pooling,
            "region": s.region,
            "topk_fraction": s.topk_fraction,
            "inset": s.inset,
            "validation": t.operating,
        },
        **calibration,
        "segmentation": {
            "map": b.segment_map,
            "threshold": t.segmentation,
            "validation_dice": t.dice,
            "kernel": cfg.evaluation.postprocess_kernel,
        },
        "prior": {
            "threshold": policy.threshold,
            "median_box": list(policy.median_box),
            "expand_up": cfg.detector.expand_up,
            "expand_side": cfg.detector.expand_side,
        },
    }


def _finite(value: Any) -> bool:
    """A JSON number (not a boolean) that is finite as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def check_bundle_doc(doc: dict[str, Any], path: Path | str, hint: str = "") -> None:
    """Refuse a ``bundle.json`` whose values cannot work (a tampered or damaged file), naming the file,
    the key and the value: non-finite thresholds, an ``image_size`` outside the config's range, unknown
    or repeated anomaly maps, unknown pooling or region, a bad prior box, a ``calibration`` (optional:
    bundles made before it have none) of an unknown method or, for Platt scaling, with a non-finite
    ``b`` or an ``a`` that is negative (a probability falling as the score rises) or not finite.

    >>> check_bundle_doc({"image_size": -5}, "m/bundle.json")
    Traceback (most recent call last):
    ...
    ValueError: m/bundle.json: image_size is -5; expected an int in [16, 2048]
    """
    tail = f"; {hint}" if hint else ""

    def bad(key: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{path}: {key} is {value!r}; expected {expected}{tail}")

    def get(key: str, default: Any = ...) -> Any:
        node: Any = doc
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not ...:
                    return default
                raise ValueError(f"{path}: missing entry {key}{tail}")
            node = node[part]
        return node

    def number(key: str, low: float | None = None, high: float | None = None, default: Any = ...) -> None:
        value = get(key, default)
        ok = _finite(value) and (low is None or value >= low) and (high is None or value <= high)
        if not ok:
            span = f" in [{low:g}, {high:g}]" if low is not None and high is not None else ""
            span = span or (f" >= {low:g}" if low is not None else "")
            raise bad(key, value, f"a finite number{span}")

    def integer(key: str, low: int, high: int | None = None, default: Any = ...) -> None:
        value = get(key, default)
        if not (isinstance(value, int) and not isinstance(value, bool)) or value < low or (high and value > high):
            raise bad(key, value, f"an int in [{low}, {high}]" if high else f"an int >= {low}")

    def choice(key: str, options: tuple[str, ...], default: Any = ...) -> None:
        value = get(key, default)
        if value not in options:
            raise bad(key, value, f"one of {', '.join(options)}")

    integer("image_size", *IMAGE_SIZE)
    integer("frame", 0, default=0)
    number("mask_margin", 0.0, default=0.0)
    known = known_maps()
    maps = get("maps")
    if not isinstance(maps, list) or not maps or len(set(map(str, maps))) != len(maps):
        raise bad("maps", maps, f"a list of distinct anomaly maps from {', '.join(known)}")
    for name in maps:
        if name not in known:
            raise bad("maps", name, f"an anomaly map from {', '.join(known)}")
    for section in ("score", "segmentation"):
        if get(f"{section}.map") not in maps:
            raise bad(f"{section}.map", get(f"{section}.map"), f"one of the bundle's maps ({', '.join(maps)})")
        number(f"{section}.threshold")
    choice("score.pooling", ("mean", "max", "topk"))
    choice("score.region", ("image", "box"))
    number("score.topk_fraction", 0.0, 1.0)
    number("score.inset", 0.0, 0.25, default=0.0)
    integer("segmentation.kernel", 1)
    number("prior.threshold", 0.0, 1.0)
    box = get("prior.median_box")
    if not isinstance(box, list) or len(box) != 4 or not all(_finite(v) for v in box):
        raise bad("prior.median_box", box, "four finite numbers [x1, y1, x2, y2]")
    number("prior.expand_up", 0.0)
    number("prior.expand_side", 0.0)
    if "calibration" in doc:
        cal = doc["calibration"]
        if not isinstance(cal, dict):
            raise bad("calibration", cal, "an object with a method")
        choice("calibration.method", CALIBRATION_METHODS)
        if cal["method"] == "platt":
            number("calibration.a", 0.0)
            number("calibration.b")


def _tensors(module: Any) -> list[Any]:
    """A module's parameters and buffers (any in-place update bumps one's ``_version``)."""
    return [*module.parameters(), *module.buffers()]


@dataclass
class BundleOutput:
    scores: np.ndarray  # [N]
    boxes: np.ndarray  # [N, 4] in model pixels
    sources: list[str]
    confidences: np.ndarray
    masks: np.ndarray  # [N, S, S] bool
    heat: np.ndarray  # [N, S, S] the segmentation map
    probabilities: np.ndarray  # [N] calibrated probability of distension (calibrate); NaN without a calibration

    @staticmethod
    def concatenate(parts: list[BundleOutput]) -> BundleOutput:
        """The outputs of consecutive parts of a batch as one.

        >>> z = np.zeros(1)
        >>> o = BundleOutput(z, np.zeros((1, 4)), ["a"], z, np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2)), z)
        >>> BundleOutput.concatenate([o, o]).sources
        ['a', 'a']
        """

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        sources = [s for p in parts for s in p.sources]
        fields = ("boxes", "confidences", "masks", "heat", "probabilities")
        boxes, confidences, masks, heat, probabilities = (cat(f) for f in fields)
        return BundleOutput(cat("scores"), boxes, sources, confidences, masks, heat, probabilities)


def _one_torch_thread() -> None:
    """A worker thread's own intra-op thread count: 1 (torch keeps it per thread)."""
    torch.get_num_threads()  # torch's lazy per-thread setup first, or the first op would undo the next line
    torch.set_num_threads(1)


class Bundle:
    """A trained bundle ready for :meth:`process`."""

    # On CPU, process() splits a batch into this many parts run at once, each by its own thread with one
    # torch thread (None: torch's thread count; 1: one part). The detector's and refiner's many small ops
    # and the U-Net's convolutions use cores better side by side than split across threads op by op.
    parts: int | None = None

    def __init__(self, doc: dict[str, Any], detector: Detector, unet: Any, device: str) -> None:
        self.doc, self.detector, self.unet, self.device = doc, detector, unet, device
        self.image_size = int(doc["image_size"])
        self.frame = int(doc.get("frame", 0))
        self.score_threshold = float(doc["score"]["threshold"])
        # the score's calibration (fit_calibration), None in a bundle made before it
        self.calibration: dict[str, Any] | None = doc.get("calibration")
        p = doc["prior"]
        x1, y1, x2, y2 = (float(v) for v in p["median_box"])
        self.policy = PriorPolicy(float(p["threshold"]), (x1, y1, x2, y2))
        self.expansion = Expansion(float(p["expand_up"]), float(p["expand_side"]))
        # names the model in DICOM results: the detector, and a digest of bundle.json's thresholds and config
        self.model_name = f"LoRIS-{doc['detector']}"
        self.model_version = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
        self._ready: tuple[tuple[Any, ...], Any] | None = None  # (weights key, prepared U-Net)
        self._pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, their pool) for split batches

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> Bundle:
        from reconstruction.checkpoint import load_model

        directory = Path(directory)
        path = directory / "bundle.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a LoRIS bundle (no bundle.json); create one with `train`")
        hint = f"the bundle {directory} is damaged: restore it or train a new one with `train`"
        doc = load_meta(path, hint=hint)
        if doc.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{path}: bundle format {doc.get('format')} is not supported (expected {BUNDLE_FORMAT})")
        check_bundle_doc(doc, path, hint)  # before the models load, and before predict claims its --out
        dev = resolve_device(device)
        det_dir = directory / "detector"
        # A refined detector (base + box refiner) says so in refined.json beside the base's files.
        # The bundle uses only the prior (the top box), so only that box is refined.
        try:
            detector = (
                RefinedDetector.load(det_dir, top_k=1)
                if (det_dir / "refined.json").is_file()
                else detector_class(str(doc.get("detector"))).load(det_dir)
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:  # a damaged detector.json, or an unknown detector
            raise ValueError(f"{det_dir}: the bundle's detector cannot be loaded ({exc}); {hint}") from None
        unet, _ = load_model(directory / "unet", map_location=dev, hint=hint)
        try:
            bundle = cls(doc, detector, unet, dev)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: missing or malformed entry ({exc.__class__.__name__}: {exc}); {hint}") from None
        cal = bundle.calibration
        if not cal or cal.get("method") != "platt":
            why = cal.get("reason", "none was fitted") if cal else "it was made before bundles were calibrated"
            print(
                f"WARNING: the bundle {directory} has no calibration of its score ({why}): "
                "predictions.csv's probability column is left empty; the verdicts are unchanged",
                file=sys.stderr,
            )
        return bundle

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """``[N]`` calibrated probabilities of distension for image scores (:func:`calibrate`; NaN without one)."""
        return calibrate(scores, self.calibration)

    def _inference_unet(self) -> Any:
        """The U-Net as :func:`reconstruction.infer.reconstruct` runs it (BatchNorm folded, channels-last),
        prepared once and again only when ``unet``, its weights or ``device`` change."""
        from reconstruction.infer import inference_model

        net = self.unet
        key = (id(net), str(self.device), *((id(t), t.data_ptr(), t._version) for t in _tensors(net)))
        if self._ready is None or self._ready[0] != key:
            self._ready = (key, inference_model(net, self.device))
        return self._ready[1]

    def _workers(self, k: int) -> ThreadPoolExecutor:
        """A pool of ``k`` threads of one torch thread each, started now (each sets its count once) and kept."""
        if self._pool is None or self._pool[0] != k:
            if self._pool is not None:
                self._pool[1].shutdown(wait=False)
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(k, thread_name_prefix="loris-bundle", initializer=_one_torch_thread)
            started = threading.Barrier(k)
            for f in [pool.submit(started.wait) for _ in range(k)]:
                f.result()
            # a worker's set_num_threads also changed the count torch gives new threads: put it back
            torch.set_num_threads(threads)
            self._pool = (k, pool)
        return self._pool[1]

    def process(self, images: np.ndarray) -> BundleOutput:
        """Detect, reconstruct, score, calibrate (:func:`calibrate`) and segment a ``[N, S, S]`` batch in [0, 1].

        On CPU the batch is split into :attr:`parts` run at once; each image's numbers do not depend on
        the split (boxes to float32 rounding).
        """
        k = min(self.parts or torch.get_num_threads(), len(images)) if self.device == "cpu" else 1
        if k <= 1:
            return self._process(images)
        self._inference_unet()  # prepared here, once, rather than raced for by the workers
        grad = torch.is_grad_enabled()  # thread-local: the workers follow the caller's mode

        def run(part: np.ndarray) -> BundleOutput:
            with torch.set_grad_enabled(grad):
                return self._process(part)

        pool = self._workers(k)
        futures = [pool.submit(run, part) for part in np.array_split(images, k)]
        return BundleOutput.concatenate([f.result() for f in futures])

    def priors(self, images: np.ndarray) -> Any:
        """The bundle's location priors (detector, fallback, expansion) for a ``[N, S, S]`` batch."""
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
        return predict_priors(self.detector, arrays, self.policy, self.expansion, batch_size=max(n, 1))

    def _process(self, images: np.ndarray) -> BundleOutput:
        """One part of :meth:`process`, in the calling thread."""
        from reconstruction.deviation import image_score
        from reconstruction.infer import reconstruct
        from reconstruction.segment import segment

        pri = self.priors(images)
        d = self.doc
        rec = reconstruct(
            self._inference_unet(),
            images,
            pri.boxes,
            maps=tuple(d["maps"]),
            device=self.device,
            margin=float(d.get("mask_margin", 0.0)),
            prepared=True,
        )
        s = d["score"]
        scores = image_score(
            rec.maps[s["map"]],
            pri.boxes,
            pooling=s["pooling"],
            region=s["region"],
            topk_fraction=s["topk_fraction"],
            margin=float(d.get("mask_margin", 0.0)),
            inset=float(s.get("inset", 0.0)),  # bundles made before the inset pool the whole box
        )
        g = d["segmentation"]
        heat = rec.maps[g["map"]]
        masks = segment(heat, float(g["threshold"]), kernel=int(g["kernel"]))
        return BundleOutput(scores, pri.boxes, pri.sources, pri.confidences, masks, heat, self.probabilities(scores))
