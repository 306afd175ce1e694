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
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from tqdm import tqdm

from detectors.base import Detector
from detectors.prior import PriorPolicy
from evaluation.aggregate import aggregate_methods, json_safe
from evaluation.bootstrap import detection_matches, detection_replicates
from evaluation.controls import CONTROLS, box_indicator, control_scores
from evaluation.detection import detection_metrics, write_coco_results
from evaluation.figures import Example, select_cases
from evaluation.intervals import NO_PRIOR, clustered_summary, fold_estimates, fold_weights, row_replicates
from evaluation.metrics import aggregate, per_image_dice, segmentation_metrics
from evaluation.report import FoldResult, ImageRow, summary_from_folds, write_report
from pipeline import stages
from pipeline.data import Data, external_paths, load_data, load_externals
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
        self.bar = tqdm(
            total=n_folds * stages_per_fold,
            desc="run",
            unit="stage",
            file=sys.stderr,
            disable=not enabled,
            position=0,
            dynamic_ncols=True,
        )

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
    margin = float(cfg["unet"]["mask_margin"])  # score.region=box pools over the pixels that were masked
    return {
        name: image_score(
            m, boxes, pooling=s["pooling"], region=s["region"], topk_fraction=s["topk_fraction"], margin=margin
        )
        for name, m in maps.items()
    }


def _control_maps(cfg: dict[str, Any], boxes: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The box-indicator map of every prior-only control (one array, shared)."""
    ind = box_indicator(boxes, size, size, float(cfg["unet"]["mask_margin"]))
    return {c: ind for c in CONTROLS}


def _method_metrics(
    cfg: dict[str, Any],
    scores: dict[str, np.ndarray],
    test_maps: dict[str, np.ndarray],
    val_maps: dict[str, np.ndarray],
    test: ScanArrays,
    val: ScanArrays,
) -> dict[str, dict[str, float]]:
    k = int(cfg["evaluation"]["postprocess_kernel"])
    return {
        name: segmentation_metrics(
            scores[name],
            test.labels,
            test_maps[name],
            test.masks,
            val_maps[name],
            val.masks,
            kernel=k,
            max_exact_pixels=int(cfg["evaluation"]["exact_pauroc_max_pixels"]),
        )
        for name in test_maps
    }


def _examples(
    fold: int,
    test: ScanArrays,
    recon: np.ndarray,
    maps: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    dice: np.ndarray,
    threshold: float,
    kernel: int,
    method: str,
) -> list[Example]:
    from reconstruction.segment import segment

    out = []
    for img_id, label, case in select_cases(
        test.ids.tolist(), test.labels.tolist(), dice.tolist(), scores[method].tolist()
    ):
        i = int(np.flatnonzero(test.ids == img_id)[0])
        out.append(
            Example(
                id=img_id,
                label=label,
                case=f"{case} (fold {fold})",
                image=test.images[i],
                reconstruction=recon[i],
                anomaly_map=maps[method][i],
                gt_mask=test.masks[i],
                pred_mask=segment(maps[method][i], threshold, kernel=kernel),
                dice=float(dice[i]),
                score=float(scores[method][i]),
                method=method,
            )
        )
    return out


class _Part(NamedTuple):
    """What one prior source gave on one evaluated set (the fold's test part or the external set)."""

    priors: stages.Priors
    recon: Reconstruction
    scores: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    dice: dict[str, np.ndarray]
    seconds: float
    replicates: dict[str, np.ndarray]


def _evaluate_part(
    cfg: dict[str, Any],
    unet: Any,
    det: Detector | None,
    policy: PriorPolicy,
    src: str,
    f: int,
    arrays: ScanArrays,
    val: ScanArrays,
    val_maps: dict[str, np.ndarray],
    result: FoldResult,
    coco_dir: Path | None,
    device: str,
    weights: np.ndarray,
    main: bool,
) -> _Part:
    """Priors, reconstructions, maps, metrics, controls, bootstrap replicates and per-image rows of
    ``arrays`` into ``result``.

    Thresholds (Dice) come from the fold's validation maps ``val_maps`` (controls included), whatever
    set is scored. ``weights`` are the part's patient-cluster bootstrap weights; ``main`` marks Table 1's
    source, whose every map gets replicates (other sources: LoRIS+MSGMSD and the controls).
    """
    from reconstruction.infer import reconstruct

    kernel = int(cfg["evaluation"]["postprocess_kernel"])
    t0 = time.perf_counter()
    pt = stages.predict_priors(cfg, det, arrays, policy)
    rt = reconstruct(
        unet, arrays.images, pt.boxes, maps=cfg["maps"], device=device, margin=float(cfg["unet"]["mask_margin"])
    )
    seconds = time.perf_counter() - t0  # inference only: detection, refinement, reconstruction, maps
    scores = _scores(cfg, rt.maps, pt.boxes)
    metrics = _method_metrics(cfg, scores, rt.maps, val_maps, arrays, val)
    ctrl_maps = _control_maps(cfg, pt.boxes, arrays.images.shape[-1])
    ctrl_scores = control_scores(pt.boxes)
    result.controls[src] = _method_metrics(cfg, ctrl_scores, ctrl_maps, val_maps, arrays, val)
    result.priors[src] = metrics["msgmsd"] if "msgmsd" in metrics else next(iter(metrics.values()))
    reps: dict[str, np.ndarray] = {}
    for name in list(rt.maps) if main else [m for m in rt.maps if m == "msgmsd"]:
        reps.update(
            row_replicates(
                src, name, metrics[name], scores[name], arrays.labels, rt.maps[name], arrays.masks, weights, kernel
            )
        )
    for name in CONTROLS:
        reps.update(
            row_replicates(
                src,
                name,
                result.controls[src][name],
                ctrl_scores[name],
                arrays.labels,
                ctrl_maps[name],
                arrays.masks,
                weights,
                kernel,
            )
        )
    if src != "gt":
        preds = [(d.boxes, d.scores) for d in pt.detections]
        result.detection[src] = detection_metrics(
            arrays.boxes, arrays.ids, preds, arrays.images.shape[1:], labels=arrays.labels
        )
        result.detection[src]["fallbacks"] = pt.fallbacks
        reps.update(
            {
                f"{src}/detection/{k}": v.astype(np.float32)
                for k, v in detection_replicates(detection_matches(arrays.boxes, preds), weights).items()
            }
        )
        if coco_dir is not None:
            # the results file pairs with annotations.json, so boxes go back to the scans' own pixels
            inv = np.concatenate([1 / arrays.scale, 1 / arrays.scale], axis=1)
            write_coco_results(
                coco_dir / "test_predictions.coco.json",
                arrays.ids,
                [(b * inv[i], sc) for i, (b, sc) in enumerate(preds)],
            )
    dice = {
        name: per_image_dice(rt.maps[name], arrays.masks, metrics[name]["dice_val_threshold"], kernel=kernel)
        for name in rt.maps
    }
    for i in range(len(arrays)):
        result.rows.append(
            ImageRow(
                id=int(arrays.ids[i]),
                patient=arrays.patients[i],
                fold=f,
                label=int(arrays.labels[i]),
                prior_source=src,
                box=tuple(float(v) for v in pt.boxes[i]),
                iou=box_iou(pt.raw_boxes[i], arrays.boxes[i]) if pt.sources[i] != "gt" else 1.0,
                scores={k: float(v[i]) for k, v in {**scores, **ctrl_scores}.items()},
                dice={k: float(v[i]) for k, v in dice.items()},
                fallback=pt.sources[i] == "fallback",
            )
        )
    return _Part(pt, rt, scores, metrics, dice, seconds, reps)


class FoldOutput(NamedTuple):
    """One fold's results: the test part, its examples, timings and infos, its bootstrap
    replicates, and per external set the same models' result and replicates."""

    result: FoldResult
    examples: list[Example]
    extra: dict[str, Any]
    replicates: dict[str, np.ndarray]
    external: list[tuple[FoldResult, dict[str, np.ndarray]]]


def run_fold(
    cfg: dict[str, Any],
    data: Data,
    f: int,
    detector_names: Sequence[str],
    out: Path,
    progress: Progress,
    externals: Sequence[ScanArrays] = (),
) -> FoldOutput:
    """One fold with one or more prior sources; the first of ``detector_names`` fills ``methods``.

    Each of ``externals`` (held-out sets) is also scored by all of the fold's models (RIAD excluded).
    """
    from reconstruction.infer import reconstruct, riad_reconstruct

    fold = data.folds[f]
    tr, va, te = data.index(fold.train), data.index(fold.val), data.index(fold.test)
    arr = data.arrays
    val, test = arr.subset(va), arr.subset(te)
    fdir = out / "folds" / str(f)
    device = stages.resolve_device(cfg)
    seed = int(cfg["seed"])
    timing: dict[str, float] = {"detector_fit_s": 0.0, "unet_fit_s": 0.0, "inference_s": 0.0, "inference_images": 0}
    info: dict[str, Any] = {"n_train": len(tr), "n_val": len(va), "n_test": len(te)}

    progress.stage(f, "U-Net")
    unet, unet_info = stages.fit_unet(cfg, data, tr, va, "single")
    timing["unet_fit_s"] += 0.0 if unet_info["cached"] else unet_info["fit_s"]
    info["unet"] = unet_info
    progress.done()

    result = FoldResult(fold=f)
    weights = fold_weights(test.patients, seed, f)
    reps: dict[str, np.ndarray] = {}
    ext_out = [(FoldResult(fold=f), {}, ext, fold_weights(ext.patients, seed, None)) for ext in externals]
    margin = float(cfg["unet"]["mask_margin"])
    size = arr.images.shape[-1]
    examples: list[Example] = []
    kernel = int(cfg["evaluation"]["postprocess_kernel"])
    median = PriorPolicy.median_of(
        arr.boxes[stages.training_subset(arr, tr, cfg["detector"]["train_classes"])], size, size
    )
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
        main = src == sources[0]
        t0 = time.perf_counter()
        pv = stages.predict_priors(cfg, det, val, policy)
        rv = reconstruct(unet, val.images, pv.boxes, maps=cfg["maps"], device=device, margin=margin)
        timing["inference_s"] += time.perf_counter() - t0
        val_maps = {**rv.maps, **_control_maps(cfg, pv.boxes, size)}
        part = _evaluate_part(
            cfg, unet, det, policy, src, f, test, val, val_maps, result, fdir / src, device, weights, main
        )
        reps.update(part.replicates)
        timing["inference_s"] += part.seconds
        timing["inference_images"] += len(va) + len(te)
        for ext_result, ext_reps, ext, ext_w in ext_out:  # the same models, each held-out set
            ext_part = _evaluate_part(
                cfg, unet, det, policy, src, f, ext, val, val_maps, ext_result, None, device, ext_w, main
            )
            ext_reps.update(ext_part.replicates)
            timing["inference_s"] += ext_part.seconds
            timing["inference_images"] += len(ext)
            if main:
                ext_result.methods.update(ext_part.metrics)
                ext_result.fallbacks = ext_part.priors.fallbacks
        if main:
            result.methods.update(part.metrics)
            result.fallbacks = part.priors.fallbacks
        if main and cfg["evaluation"]["figures"]:
            m = "dd" if "dd" in part.recon.maps else next(iter(part.recon.maps))
            examples = _examples(
                f,
                test,
                part.recon.recon,
                part.recon.maps,
                part.scores,
                part.dice[m],
                part.metrics[m]["dice_val_threshold"],
                kernel,
                m,
            )
        progress.done()

    if cfg["riad"]["enabled"]:
        progress.stage(f, "RIAD")
        riad, riad_info = stages.fit_unet(cfg, data, tr, va, "riad")
        timing["unet_fit_s"] += 0.0 if riad_info["cached"] else riad_info["fit_s"]
        info["riad"] = riad_info
        ks = tuple(int(k) for k in cfg["riad"]["ks"])
        rv = riad_reconstruct(riad, val.images, ks=ks, maps=(RIAD,), device=device, seed=seed)
        rt = riad_reconstruct(riad, test.images, ks=ks, maps=(RIAD,), device=device, seed=seed)
        # RIAD has no location prior: always pool over the whole image
        scores = _scores({**cfg, "score": {**cfg["score"], "region": "image"}}, rt.maps, test.boxes)
        riad_metrics = _method_metrics(cfg, scores, rt.maps, rv.maps, test, val)
        result.methods.update(riad_metrics)
        reps.update(
            row_replicates(
                NO_PRIOR,
                RIAD,
                riad_metrics[RIAD],
                scores[RIAD],
                test.labels,
                rt.maps[RIAD],
                test.masks,
                weights,
                kernel,
            )
        )
        pos = {int(i): n for n, i in enumerate(test.ids)}
        for row in result.rows:  # an image-level score, the same whatever the row's prior
            row.scores[RIAD] = float(scores[RIAD][pos[row.id]])
        progress.done()
    return FoldOutput(result, examples, {"timing": timing, "info": info}, reps, [(r, x) for r, x, _, _ in ext_out])


def _save_fold(fdir: Path, fo: FoldOutput) -> None:
    fdir.mkdir(parents=True, exist_ok=True)
    # everything else first: fold.json's presence marks the fold done
    _save_replicates(fdir / "bootstrap.npz", fo.replicates)
    for i, (ext, ext_reps) in enumerate(fo.external):
        write_json(fdir / f"external-{i}.json", json_safe(asdict(ext)))
        _save_replicates(fdir / f"bootstrap-external-{i}.npz", ext_reps)
    if fo.examples:
        arrays = {
            f"{i}_{k}": getattr(e, k)
            for i, e in enumerate(fo.examples)
            for k in ("image", "reconstruction", "anomaly_map", "gt_mask", "pred_mask")
        }
        atomic_write(fdir / "examples.npz", lambda p: np.savez_compressed(open(p, "wb"), **arrays))
    meta = [{k: getattr(e, k) for k in ("id", "label", "case", "dice", "score", "method")} for e in fo.examples]
    write_json(fdir / "fold.json", json_safe({"result": asdict(fo.result), "examples": meta, **fo.extra}))


def _save_replicates(path: Path, reps: dict[str, np.ndarray]) -> None:
    # npz keys cannot hold "/" portably; the row names never contain "|"
    arrays = {k.replace("/", "|"): v for k, v in reps.items()}
    atomic_write(path, lambda p: np.savez_compressed(open(p, "wb"), **arrays))


def _load_replicates(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: this fold was finished by an older LoRIS without bootstrap replicates; "
            f"start the run again in a new --out folder"
        )
    with np.load(path) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


def _fold_result(r: dict[str, Any]) -> FoldResult:
    rows = [ImageRow(**{**row, "box": tuple(row["box"]) if row["box"] else None}) for row in r.pop("rows")]
    return FoldResult(**r, rows=rows)


def _load_fold(fdir: Path, n_external: int) -> FoldOutput:
    doc = json.loads((fdir / "fold.json").read_text())
    result = _fold_result(doc["result"])
    examples = []
    if doc["examples"]:
        with np.load(fdir / "examples.npz") as z:
            for i, meta in enumerate(doc["examples"]):
                examples.append(
                    Example(
                        **meta,
                        **{
                            k: z[f"{i}_{k}"] for k in ("image", "reconstruction", "anomaly_map", "gt_mask", "pred_mask")
                        },
                    )
                )
    ext = [
        (
            _fold_result(json.loads((fdir / f"external-{i}.json").read_text())),
            _load_replicates(fdir / f"bootstrap-external-{i}.npz"),
        )
        for i in range(n_external)
    ]
    return FoldOutput(
        result, examples, {k: doc[k] for k in ("timing", "info")}, _load_replicates(fdir / "bootstrap.npz"), ext
    )


def _external_dirs(out: Path, paths: Sequence[str]) -> list[Path]:
    """Report folder per external set: ``<out>/external`` for one, ``<out>/external/<name>`` for several."""
    if len(paths) == 1:
        return [out / "external"]
    names: list[str] = []
    for p in paths:
        base = Path(p).name or "set"
        names.append(base if base not in names else f"{base}-{len(names)}")
    return [out / "external" / n for n in names]


def _check_parts(data: Data, fold_ids: Sequence[int]) -> None:
    bad = [f for f in fold_ids if not 0 <= int(f) < len(data.folds)]
    if bad:
        raise ValueError(f"folds {bad} do not exist; the data has {len(data.folds)} folds")
    for f in fold_ids:
        for part in ("val", "test"):
            labels = data.arrays.labels[data.index(getattr(data.folds[int(f)], part))]
            if len(set(labels.tolist()) & {0, 1}) < 2:
                raise ValueError(
                    f"fold {f}: its {part} part holds only {'distended' if labels.all() else 'normal'} "
                    f"scans, so AUROC and the validation Dice threshold are undefined; use more data, "
                    f"fewer folds (--set folds=3) or a splits.json with both classes in every part"
                )


def _summarise(
    results: Sequence[FoldResult], reps: Sequence[dict[str, np.ndarray]], main_source: str, reported: str | None
) -> dict[str, Any]:
    """Fold aggregates, prior-only controls and patient-clustered intervals of one evaluated set."""
    out = summary_from_folds(results, detector=reported)
    sources = sorted({s for r in results for s in r.controls})
    out["controls"] = {
        s: {c: v for c, v in aggregate_methods([r.controls[s] for r in results if s in r.controls]).items()}
        for s in sources
    }
    estimates = [fold_estimates(r.methods, r.priors, r.controls, main_source, r.detection) for r in results]
    out["clustered"] = clustered_summary(estimates, reps, main_source=main_source)
    return out


def execute(
    cfg: dict[str, Any], out: Path, detector_names: Sequence[str], command: str = "run", progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the cross-validation into ``out`` and write every output; returns the summary."""
    t_start = time.perf_counter()
    stages.set_threads(cfg)
    identity: dict[str, Any] = {"command": command, "detectors": list(detector_names)}
    ext_paths = external_paths(cfg)
    if ext_paths:  # a resume must score the same held-out sets
        identity["external_annotations"] = [
            stages.annotations_fingerprint(Path(p)) for p in ext_paths if (Path(p) / "annotations.json").is_file()
        ]
    out = prepare_run_dir(out, cfg, identity=identity)
    data = load_data(cfg)
    externals = load_externals(cfg, data)
    write_json(out / "splits.json", [fold.to_json() for fold in data.folds])
    fold_ids = cfg["run_folds"] if cfg.get("run_folds") is not None else list(range(len(data.folds)))
    _check_parts(data, fold_ids)
    n_src = len(set(detector_names) | {"gt"})
    per_fold = 1 + n_src + sum(d != "gt" for d in set(detector_names)) + (1 if cfg["riad"]["enabled"] else 0)
    bar = Progress(len(fold_ids), per_fold, progress)
    outputs: list[FoldOutput] = []
    resumed = 0
    try:
        for f in fold_ids:
            fdir = out / "folds" / str(f)
            if (fdir / "fold.json").is_file():
                fo = _load_fold(fdir, len(externals))
                resumed += 1
                bar.done(per_fold)
            else:
                fo = run_fold(cfg, data, int(f), detector_names, out, bar, externals)
                _save_fold(fdir, fo)
            outputs.append(fo)
    finally:
        bar.close()
    results = [fo.result for fo in outputs]
    extras = [fo.extra for fo in outputs]

    main_source = detector_names[0]
    summary: dict[str, Any] = {
        "detector": main_source if command == "run" else list(detector_names),
        "data": str(data.root),
        "profile": cfg["profile"],
        "folds": [int(f) for f in fold_ids],
        "folds_source": data.folds_source,
    }
    # whose detection metrics fill summary["detection"]: run's own detector; none for gt or ablate
    reported = main_source if command == "run" and main_source != "gt" else None
    summary.update(_summarise(results, [fo.replicates for fo in outputs], main_source, reported))
    if command == "ablate":
        summary["detection_by_detector"] = {
            d: aggregate([r.detection[d] for r in results if d in r.detection]) for d in detector_names if d != "gt"
        }
        summary["fallbacks_by_detector"] = {
            d: int(sum(r.detection[d].get("fallbacks", 0) for r in results if d in r.detection))
            for d in detector_names
            if d != "gt"
        }
    if "detection" not in summary:
        none = {"mean": None, "std": None}
        note = (
            "several detectors: see detection_by_detector"
            if command == "ablate"
            else "ground-truth priors: no detector"
        )
        summary["detection"] = {
            "precision": none,
            "map50": none,
            "map75": none,
            "fallbacks": sum(r.fallbacks for r in results),
            "note": note,
        }
    timing = {k: float(sum(e["timing"][k] for e in extras)) for k in ("detector_fit_s", "unet_fit_s", "inference_s")}
    n_inf = sum(e["timing"]["inference_images"] for e in extras)
    # total_s is this invocation's wall time; folds resumed from disk kept their stage times above.
    summary["timing"] = {
        "total_s": time.perf_counter() - t_start,
        "resumed_folds": resumed,
        **timing,
        "inference_images_per_s": n_inf / timing["inference_s"] if timing["inference_s"] else None,
    }
    summary["fold_info"] = [e["info"] for e in extras]
    examples = [e for fo in outputs for e in fo.examples]
    if examples:
        picks = select_cases(
            [e.id for e in examples],
            [e.label for e in examples],
            [e.dice for e in examples],
            [e.score for e in examples],
        )
        by_id = {e.id: e for e in examples}
        examples = [
            Example(**{**{k: getattr(by_id[i], k) for k in Example.__dataclass_fields__}, "case": c})
            for i, _, c in picks
        ]
    prior_name = {"gt": "ground-truth", "yolov5": "YOLOv5u", "codetr": "Co-DETR"}.get(main_source, main_source)
    summary["external"] = []
    for i, (path, ext_dir) in enumerate(zip(ext_paths, _external_dirs(out, ext_paths))):
        ext_results = [fo.external[i][0] for fo in outputs]
        ext_summary = {
            "detector": summary["detector"],
            "data": path,
            "trained_on": str(data.root),
            "profile": cfg["profile"],
            "folds": summary["folds"],
            "images": len(externals[i]),
            "distended": int((externals[i].labels == 1).sum()),
            "note": "each fold's models scored every image of this held-out set; thresholds from "
            "each fold's validation part; intervals resample its patients once for all fold "
            "models; RIAD not run here",
            **_summarise(ext_results, [fo.external[i][1] for fo in outputs], main_source, reported),
        }
        write_report(
            ext_dir,
            ext_summary,
            ext_results,
            cfg,
            package_versions(),
            (),
            prior_name=prior_name,
            figures=bool(cfg["evaluation"]["figures"]),
            clustered=ext_summary["clustered"],
        )
        write_json(ext_dir / "summary.json", json_safe(ext_summary))
        summary["external"].append(
            {
                "data": path,
                "report": str(ext_dir.relative_to(out)),
                **{k: ext_summary[k] for k in ("images", "distended", "controls", "clustered")},
                **{k: ext_summary[k] for k in ("priors", "prior_comparison") if k in ext_summary},
            }
        )
    write_report(
        out,
        summary,
        results,
        cfg,
        package_versions(),
        examples if cfg["evaluation"]["figures"] else (),
        prior_name=prior_name,
        figures=bool(cfg["evaluation"]["figures"]),
        clustered=summary["clustered"],
    )
    write_json(out / "per_fold.json", json_safe([asdict(r) | {"rows": len(r.rows)} for r in results]))
    write_json(out / "summary.json", json_safe(summary))  # last: its presence marks the run finished
    return summary
