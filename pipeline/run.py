"""``run`` and ``ablate``: patient-grouped cross-validation of LoRIS with one or more prior sources.

Per fold: fit the detector(s) on normal training scans, fit (or reuse) the U-Net and the RIAD
baseline, predict priors for validation and test scans, reconstruct, compute every anomaly
map in one pass, and evaluate. A fold's result is saved as soon as it is done, so a killed run
resumes at the next fold.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from detectors.base import Detector
from detectors.prior import PriorPolicy
from evaluation.aggregate import json_safe
from evaluation.detection import detection_metrics, write_coco_results
from evaluation.figures import Example, select_cases
from evaluation.metrics import aggregate, per_image_dice, segmentation_metrics
from evaluation.report import FoldResult, ImageRow, summary_from_folds, write_report
from pipeline import stages
from pipeline.data import Data, load_data, load_external
from pipeline.outputs import prepare_run_dir, write_json
from pipeline.provenance import package_versions
from scans.io import atomic_write
from scans.records import ScanArrays, box_iou

if TYPE_CHECKING:
    from reconstruction.infer import Reconstruction

RIAD = "riad"


class Progress:
    """One bar over all (fold, stage) steps, showing fold, stage and ETA."""

    def __init__(self, n_folds: int, stages_per_fold: int, enabled: bool = True) -> None:
        self.bar = tqdm(total=n_folds * stages_per_fold, desc="run", unit="stage", file=sys.stderr,
                        disable=not enabled, position=0, dynamic_ncols=True)

    def stage(self, fold: int, name: str) -> None:
        self.bar.set_description(f"fold {fold} · {name}")
        self.bar.refresh()

    def done(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _scores(cfg: dict[str, Any], maps: dict[str, np.ndarray], boxes: np.ndarray) -> dict[str, np.ndarray]:
    from reconstruction.deviation import image_score

    s = cfg["score"]
    return {name: image_score(m, boxes, pooling=s["pooling"], region=s["region"], topk_fraction=s["topk_fraction"])
            for name, m in maps.items()}


def _method_metrics(cfg: dict[str, Any], scores: dict[str, np.ndarray], test_maps: dict[str, np.ndarray],
                    val_maps: dict[str, np.ndarray], test: ScanArrays, val: ScanArrays) -> dict[str, dict[str, float]]:
    k = int(cfg["evaluation"]["postprocess_kernel"])
    return {name: segmentation_metrics(scores[name], test.labels, test_maps[name], test.masks, val_maps[name],
                                       val.masks, kernel=k,
                                       max_exact_pixels=int(cfg["evaluation"]["exact_pauroc_max_pixels"]))
            for name in test_maps}


def _examples(fold: int, test: ScanArrays, recon: np.ndarray, maps: dict[str, np.ndarray], scores: dict[str, np.ndarray],
              dice: np.ndarray, threshold: float, kernel: int, method: str) -> list[Example]:
    from reconstruction.segment import segment

    out = []
    for img_id, label, case in select_cases(test.ids.tolist(), test.labels.tolist(), dice.tolist(),
                                            scores[method].tolist()):
        i = int(np.flatnonzero(test.ids == img_id)[0])
        out.append(Example(id=img_id, label=label, case=f"{case} (fold {fold})", image=test.images[i],
                           reconstruction=recon[i], anomaly_map=maps[method][i], gt_mask=test.masks[i],
                           pred_mask=segment(maps[method][i], threshold, kernel=kernel),
                           dice=float(dice[i]), score=float(scores[method][i]), method=method))
    return out


class _Part(NamedTuple):
    """What one prior source gave on one evaluated set (the fold's test part or the external set)."""

    priors: stages.Priors
    recon: Reconstruction
    scores: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    dice: dict[str, np.ndarray]
    seconds: float


def _evaluate_part(cfg: dict[str, Any], unet: Any, det: Detector | None, policy: PriorPolicy, src: str, f: int,
                   arrays: ScanArrays, val: ScanArrays, val_maps: dict[str, np.ndarray], result: FoldResult,
                   coco_dir: Path | None, device: str) -> _Part:
    """Priors, reconstructions, maps, metrics and per-image rows of ``arrays`` into ``result``.

    Thresholds (Dice) come from the fold's validation maps ``val_maps``, whatever set is scored.
    """
    from reconstruction.infer import reconstruct

    kernel = int(cfg["evaluation"]["postprocess_kernel"])
    t0 = time.perf_counter()
    pt = stages.predict_priors(cfg, det, arrays, policy)
    rt = reconstruct(unet, arrays.images, pt.boxes, maps=cfg["maps"], device=device,
                     margin=float(cfg["unet"]["mask_margin"]))
    seconds = time.perf_counter() - t0  # inference only: detection, refinement, reconstruction, maps
    scores = _scores(cfg, rt.maps, pt.boxes)
    metrics = _method_metrics(cfg, scores, rt.maps, val_maps, arrays, val)
    result.priors[src] = metrics["msgmsd"] if "msgmsd" in metrics else next(iter(metrics.values()))
    if src != "gt":
        preds = [(d.boxes, d.scores) for d in pt.detections]
        result.detection[src] = detection_metrics(arrays.boxes, arrays.ids, preds, arrays.images.shape[1:],
                                                  labels=arrays.labels)
        result.detection[src]["fallbacks"] = pt.fallbacks
        if coco_dir is not None:
            # the results file pairs with annotations.json, so boxes go back to the scans' own pixels
            inv = np.concatenate([1 / arrays.scale, 1 / arrays.scale], axis=1)
            write_coco_results(coco_dir / "test_predictions.coco.json", arrays.ids,
                               [(b * inv[i], sc) for i, (b, sc) in enumerate(preds)])
    dice = {name: per_image_dice(rt.maps[name], arrays.masks, metrics[name]["dice_val_threshold"], kernel=kernel)
            for name in rt.maps}
    for i in range(len(arrays)):
        result.rows.append(ImageRow(
            id=int(arrays.ids[i]), patient=arrays.patients[i], fold=f, label=int(arrays.labels[i]), prior_source=src,
            box=tuple(float(v) for v in pt.boxes[i]),
            iou=box_iou(pt.raw_boxes[i], arrays.boxes[i]) if pt.sources[i] != "gt" else 1.0,
            scores={k: float(v[i]) for k, v in scores.items()}, dice={k: float(v[i]) for k, v in dice.items()},
            fallback=pt.sources[i] == "fallback"))
    return _Part(pt, rt, scores, metrics, dice, seconds)


def run_fold(cfg: dict[str, Any], data: Data, f: int, detector_names: Sequence[str], out: Path,
             progress: Progress, external: ScanArrays | None = None
             ) -> tuple[FoldResult, list[Example], dict[str, Any], FoldResult | None]:
    """One fold with one or more prior sources; the first of ``detector_names`` fills ``methods``.

    With ``external`` (a held-out set) the fold's models also score all of it: the last item
    returned is that result (RIAD excluded), else None.
    """
    from reconstruction.infer import reconstruct, riad_reconstruct

    fold = data.folds[f]
    tr, va, te = data.index(fold.train), data.index(fold.val), data.index(fold.test)
    arr = data.arrays
    val, test = arr.subset(va), arr.subset(te)
    fdir = out / "folds" / str(f)
    device = stages.resolve_device(cfg)
    timing: dict[str, float] = {"detector_fit_s": 0.0, "unet_fit_s": 0.0, "inference_s": 0.0, "inference_images": 0}
    info: dict[str, Any] = {"n_train": len(tr), "n_val": len(va), "n_test": len(te)}

    progress.stage(f, "U-Net")
    unet, unet_info = stages.fit_unet(cfg, data, tr, va, "single")
    timing["unet_fit_s"] += 0.0 if unet_info["cached"] else unet_info["fit_s"]
    info["unet"] = unet_info
    progress.done()

    result = FoldResult(fold=f)
    ext_result = FoldResult(fold=f) if external is not None else None
    margin = float(cfg["unet"]["mask_margin"])
    examples: list[Example] = []
    kernel = int(cfg["evaluation"]["postprocess_kernel"])
    median = PriorPolicy.median_of(arr.boxes[stages.training_subset(arr, tr, cfg["detector"]["train_classes"])],
                                   arr.images.shape[-1], arr.images.shape[-1])
    policy = PriorPolicy(float(cfg["detector"]["threshold"]), median)
    sources = list(dict.fromkeys(detector_names))
    if "gt" not in sources:
        sources.append("gt")  # the upper baseline is cheap once the U-Net exists
    for src in sources:
        det: Detector | None = None
        if src != "gt":
            progress.stage(f, f"{src} fit")
            scfg = {**cfg, "detector": {**cfg["detector"], "name": src}}
            det, det_info = stages.fit_detector(scfg, data, tr, va, fdir / src)
            timing["detector_fit_s"] += 0.0 if det_info["cached"] else float(det_info.get("fit_s", 0.0))
            ref_info = det_info.get("refiner") or {"cached": True}
            timing["detector_fit_s"] += 0.0 if ref_info["cached"] else float(ref_info.get("fit_s", 0.0))
            info[f"detector_{src}"] = det_info
            progress.done()
        progress.stage(f, f"{src} priors + maps")
        t0 = time.perf_counter()
        pv = stages.predict_priors(cfg, det, val, policy)
        rv = reconstruct(unet, val.images, pv.boxes, maps=cfg["maps"], device=device, margin=margin)
        timing["inference_s"] += time.perf_counter() - t0
        part = _evaluate_part(cfg, unet, det, policy, src, f, test, val, rv.maps, result, fdir / src, device)
        timing["inference_s"] += part.seconds
        timing["inference_images"] += len(va) + len(te)
        if external is not None and ext_result is not None:  # the same models, the held-out set
            ext_part = _evaluate_part(cfg, unet, det, policy, src, f, external, val, rv.maps, ext_result, None, device)
            timing["inference_s"] += ext_part.seconds
            timing["inference_images"] += len(external)
            if src == sources[0]:
                ext_result.methods.update(ext_part.metrics)
                ext_result.fallbacks = ext_part.priors.fallbacks
        if src == sources[0]:
            result.methods.update(part.metrics)
            result.fallbacks = part.priors.fallbacks
        if src == sources[0] and cfg["evaluation"]["figures"]:
            m = "dd" if "dd" in part.recon.maps else next(iter(part.recon.maps))
            examples = _examples(f, test, part.recon.recon, part.recon.maps, part.scores, part.dice[m],
                                 part.metrics[m]["dice_val_threshold"], kernel, m)
        progress.done()

    if cfg["riad"]["enabled"]:
        progress.stage(f, "RIAD")
        riad, riad_info = stages.fit_unet(cfg, data, tr, va, "riad")
        timing["unet_fit_s"] += 0.0 if riad_info["cached"] else riad_info["fit_s"]
        info["riad"] = riad_info
        ks = tuple(int(k) for k in cfg["riad"]["ks"])
        rv = riad_reconstruct(riad, val.images, ks=ks, maps=(RIAD,), device=device, seed=cfg["seed"])
        rt = riad_reconstruct(riad, test.images, ks=ks, maps=(RIAD,), device=device, seed=cfg["seed"])
        # RIAD has no location prior: always pool over the whole image
        scores = _scores({**cfg, "score": {**cfg["score"], "region": "image"}}, rt.maps, test.boxes)
        result.methods.update(_method_metrics(cfg, scores, rt.maps, rv.maps, test, val))
        pos = {int(i): n for n, i in enumerate(test.ids)}
        for row in result.rows:  # an image-level score, the same whatever the row's prior
            row.scores[RIAD] = float(scores[RIAD][pos[row.id]])
        progress.done()
    return result, examples, {"timing": timing, "info": info}, ext_result


def _save_fold(fdir: Path, result: FoldResult, examples: list[Example], extra: dict[str, Any],
               external: FoldResult | None = None) -> None:
    fdir.mkdir(parents=True, exist_ok=True)
    if external is not None:  # before fold.json, whose presence marks the fold done
        write_json(fdir / "external.json", json_safe(asdict(external)))
    if examples:
        arrays = {f"{i}_{k}": getattr(e, k) for i, e in enumerate(examples)
                  for k in ("image", "reconstruction", "anomaly_map", "gt_mask", "pred_mask")}
        atomic_write(fdir / "examples.npz", lambda p: np.savez_compressed(open(p, "wb"), **arrays))
    meta = [{k: getattr(e, k) for k in ("id", "label", "case", "dice", "score", "method")} for e in examples]
    write_json(fdir / "fold.json", json_safe({"result": asdict(result), "examples": meta, **extra}))


def _fold_result(r: dict[str, Any]) -> FoldResult:
    rows = [ImageRow(**{**row, "box": tuple(row["box"]) if row["box"] else None}) for row in r.pop("rows")]
    return FoldResult(**r, rows=rows)


def _load_fold(fdir: Path) -> tuple[FoldResult, list[Example], dict[str, Any]]:
    doc = json.loads((fdir / "fold.json").read_text())
    result = _fold_result(doc["result"])
    examples = []
    if doc["examples"]:
        with np.load(fdir / "examples.npz") as z:
            for i, meta in enumerate(doc["examples"]):
                examples.append(Example(**meta, **{k: z[f"{i}_{k}"] for k in
                                                   ("image", "reconstruction", "anomaly_map", "gt_mask", "pred_mask")}))
    return result, examples, {k: doc[k] for k in ("timing", "info")}


def execute(cfg: dict[str, Any], out: Path, detector_names: Sequence[str], command: str = "run",
            progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the cross-validation into ``out`` and write every output; returns the summary."""
    t_start = time.perf_counter()
    stages.set_threads(cfg)
    identity: dict[str, Any] = {"command": command, "detectors": list(detector_names)}
    ext_path = cfg["evaluation"].get("external")
    if ext_path and (Path(ext_path) / "annotations.json").is_file():  # a resume must score the same held-out set
        identity["external_annotations"] = stages.annotations_fingerprint(Path(ext_path))
    out = prepare_run_dir(out, cfg, identity=identity)
    data = load_data(cfg)
    external = load_external(cfg, data)
    write_json(out / "splits.json", [fold.to_json() for fold in data.folds])
    fold_ids = cfg["run_folds"] if cfg.get("run_folds") is not None else list(range(len(data.folds)))
    bad = [f for f in fold_ids if not 0 <= int(f) < len(data.folds)]
    if bad:
        raise ValueError(f"folds {bad} do not exist; the data has {len(data.folds)} folds")
    for f in fold_ids:
        for part in ("val", "test"):
            labels = data.arrays.labels[data.index(getattr(data.folds[int(f)], part))]
            if len(set(labels.tolist()) & {0, 1}) < 2:
                raise ValueError(f"fold {f}: its {part} part holds only {'distended' if labels.all() else 'normal'} "
                                 f"scans, so AUROC and the validation Dice threshold are undefined; use more data, "
                                 f"fewer folds (--set folds=3) or a splits.json with both classes in every part")
    n_src = len(set(detector_names) | {"gt"})
    per_fold = 1 + n_src + sum(d != "gt" for d in set(detector_names)) + (1 if cfg["riad"]["enabled"] else 0)
    bar = Progress(len(fold_ids), per_fold, progress)
    results: list[FoldResult] = []
    ext_results: list[FoldResult] = []
    examples: list[Example] = []
    extras: list[dict[str, Any]] = []
    resumed = 0
    try:
        for f in fold_ids:
            fdir = out / "folds" / str(f)
            if (fdir / "fold.json").is_file():
                r, ex, extra = _load_fold(fdir)
                ext = _fold_result(json.loads((fdir / "external.json").read_text())) if external is not None else None
                resumed += 1
                bar.done(per_fold)
            else:
                r, ex, extra, ext = run_fold(cfg, data, int(f), detector_names, out, bar, external)
                _save_fold(fdir, r, ex, extra, ext)
            results.append(r)
            if ext is not None:
                ext_results.append(ext)
            examples.extend(ex)
            extras.append(extra)
    finally:
        bar.close()

    summary: dict[str, Any] = {"detector": detector_names[0] if command == "run" else list(detector_names),
                               "data": str(data.root), "profile": cfg["profile"], "folds": [int(f) for f in fold_ids],
                               "folds_source": data.folds_source}
    # whose detection metrics fill summary["detection"]: run's own detector; none for gt or ablate
    reported = detector_names[0] if command == "run" and detector_names[0] != "gt" else None
    summary.update(summary_from_folds(results, detector=reported))
    if command == "ablate":
        summary["detection_by_detector"] = {
            d: aggregate([r.detection[d] for r in results if d in r.detection]) for d in detector_names if d != "gt"}
        summary["fallbacks_by_detector"] = {
            d: int(sum(r.detection[d].get("fallbacks", 0) for r in results if d in r.detection))
            for d in detector_names if d != "gt"}
    if "detection" not in summary:
        none = {"mean": None, "std": None}
        note = ("several detectors: see detection_by_detector" if command == "ablate"
                else "ground-truth priors: no detector")
        summary["detection"] = {"precision": none, "map50": none, "map75": none,
                                "fallbacks": sum(r.fallbacks for r in results), "note": note}
    timing = {k: float(sum(e["timing"][k] for e in extras)) for k in ("detector_fit_s", "unet_fit_s", "inference_s")}
    n_inf = sum(e["timing"]["inference_images"] for e in extras)
    # total_s is this invocation's wall time; folds resumed from disk kept their stage times above.
    summary["timing"] = {"total_s": time.perf_counter() - t_start, "resumed_folds": resumed, **timing,
                         "inference_images_per_s": n_inf / timing["inference_s"] if timing["inference_s"] else None}
    summary["fold_info"] = [e["info"] for e in extras]
    cand = examples
    if cand:
        picks = select_cases([e.id for e in cand], [e.label for e in cand], [e.dice for e in cand],
                             [e.score for e in cand])
        by_id = {e.id: e for e in cand}
        examples = [Example(**{**{k: getattr(by_id[i], k) for k in Example.__dataclass_fields__}, "case": c})
                    for i, _, c in picks]
    prior_name = {"gt": "ground-truth", "yolov5": "YOLOv5u", "codetr": "Co-DETR"}.get(detector_names[0],
                                                                                      detector_names[0])
    if external is not None:
        ext_summary = {"detector": summary["detector"], "data": str(cfg["evaluation"]["external"]),
                       "trained_on": str(data.root), "profile": cfg["profile"], "folds": summary["folds"],
                       "images": len(external), "distended": int((external.labels == 1).sum()),
                       "note": "each fold's models scored every image of this held-out set; thresholds from "
                               "each fold's validation part; RIAD not run here",
                       **summary_from_folds(ext_results, detector=reported)}
        write_report(out / "external", ext_summary, ext_results, cfg, package_versions(), (),
                     prior_name=prior_name, figures=bool(cfg["evaluation"]["figures"]))
        write_json(out / "external" / "summary.json", json_safe(ext_summary))
        summary["external"] = {k: ext_summary[k] for k in ("data", "images", "distended")} | {
            k: ext_summary[k] for k in ("priors", "prior_comparison") if k in ext_summary}
    write_report(out, summary, results, cfg, package_versions(), examples if cfg["evaluation"]["figures"] else (),
                 prior_name=prior_name, figures=bool(cfg["evaluation"]["figures"]))
    write_json(out / "per_fold.json", json_safe([asdict(r) | {"rows": len(r.rows)} for r in results]))
    write_json(out / "summary.json", json_safe(summary))  # last: its presence marks the run finished
    return summary
