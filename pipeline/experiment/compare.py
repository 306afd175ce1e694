"""``compare``: Table 1 in full, LoRIS beside RIAD and the Table 1 peers on the same folds (``docs/design.md``,
"Peers").

LoRIS and RIAD are ``run``'s own folds (:func:`pipeline.experiment.run.run_folds`: the same split code and seed, the
same cached U-Nets, priors and scoring), so their rows equal ``run``'s. Each peer
(:mod:`reconstruction.peers`) trains per fold on the fold's normal training scans (the supervised
``multitask`` on both classes) with the budget named like the profile, and is cached like the U-Nets
(:func:`fit_peer`). Every method is scored by the project's metric code on the same test scans with the
same patient-cluster bootstrap weights (:func:`evaluation.intervals.fold_weights`), so its paired
differences against LoRIS+MSGMSD are replicate-wise. A method's fold result is saved as soon as it is
done (``folds/<k>/compare/<method>.json`` last), so a killed comparison resumes, and a finished one takes
more methods in place (``compare --methods <new> --out <its folder>``, same settings: :func:`added_settings`).
Every prior-guided row also appears under the other pooling rule, and rows with validation scores carry
their calibration error, all rescored from scores computed once (:mod:`evaluation.rescoring`).

>>> parse_methods("patchcore, RIAD")
['loris', 'patchcore', 'riad']
>>> parse_methods("patchcore,nope")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: unknown method(s) nope; choose from loris, riad, cflow, draem, ...
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evaluation.aggregate import RIAD, json_safe
from evaluation.bootstrap import weighted_auroc
from evaluation.intervals import NO_PRIOR, fold_weights, row_replicates
from evaluation.metrics import image_auroc
from evaluation.rescoring import SCORE, VAL_SCORE, auroc_row, ece_row, kept_rows, pooled_row, split_pooled
from pipeline import registry
from pipeline.config import Config
from pipeline.experiment.compare_peers import PeerJob, fit_peer, peer_job
from pipeline.experiment.compare_report import summarise, write_compare_report
from pipeline.experiment.compare_store import load_method, save_method
from pipeline.experiment.compare_text import summary_lines
from pipeline.experiment.compare_types import LORIS, MethodFold, Reps, Rows, Scored, Settings
from pipeline.experiment.fold import FoldOutput, FoldTask, Progress
from pipeline.experiment.fold_eval import EvalSettings, Validation, method_metrics
from pipeline.experiment.run import RunPlan, plan, run_folds
from pipeline.run_dirs import (
    RunDirError,
    adding_to,
    backfill,
    config_differences,
    default_run_dir,
    run_config,
    run_lock,
    write_json,
)
from pipeline.shared.calibration import calibrate, fit_calibration
from pipeline.shared.models import fit_detector, fit_unet
from pipeline.shared.priors import fold_policy, predict_priors
from reconstruction.peers import PEERS, Budget, PeerOutput
from reconstruction.peers.prior_guided import PriorPeer, predict_peer
from runtime.device import set_threads
from runtime.timing import Stopwatch
from scans.records import ScanArrays

PEER_DIR = "compare"  # per fold: <method>.json (written last) and <method>.npz
SAVED_AS = "rows=2"  # in a saved method's key: results saved before its ECE and pooling rows are redone
# profile -> the peers' named budget
PEER_BUDGETS = {"quick": "quick", "default": "default", "faithful": "default", "paper": "paper"}


def method_choices() -> list[str]:
    """Every method ``compare`` knows: LoRIS, RIAD, then the registered peers."""
    return [LORIS, RIAD, *sorted(n for n in PEERS if n not in (LORIS, RIAD))]


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """The methods asked for (comma-separated or a list), LoRIS first: it is the reference of every paired
    difference. A name not in :func:`method_choices` is refused with the list of choices."""
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [m.strip().lower() for m in items if m.strip()]
    known = method_choices()
    bad = [m for m in names if m not in known]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(known)}")
    return list(dict.fromkeys([LORIS, *names]))


# ----------------------------------------------------------------------------- scoring


def score_part(
    ev: EvalSettings, name: str, out: PeerOutput, arrays: ScanArrays, validation: Validation | None, w: np.ndarray
) -> Scored:
    """A peer's metrics and replicates (row ``none/<name>``) on ``arrays``; I-AUROC only without maps.
    ``validation`` holds the peer's validation maps (the val-threshold Dice); ``w`` the bootstrap weights."""
    if out.maps is None or validation is None:
        reps = {f"{NO_PRIOR}/{name}/i_auroc": weighted_auroc(out.scores, arrays.labels, w).astype(np.float32)}
        return {"i_auroc": image_auroc(out.scores, arrays.labels)}, reps
    m = method_metrics(ev, {name: out.scores}, {name: out.maps}, arrays, validation)[name]
    return m, row_replicates(NO_PRIOR, name, m, out.scores, arrays.labels, out.maps, arrays.masks, w, ev.kernel)


def probabilities(val_scores: np.ndarray, val_labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``scores`` as probabilities of distension by the bundle's Platt scaling fitted on the validation
    scores (:func:`pipeline.shared.calibration.fit_calibration`); NaN where none can be fitted."""
    if not np.all(np.isfinite(val_scores)):
        return np.full(np.shape(scores), np.nan)
    return calibrate(scores, fit_calibration(val_scores, val_labels))


def rescored(
    src: str, per_image: Mapping[str, np.ndarray], val_labels: np.ndarray, labels: np.ndarray, w: np.ndarray
) -> tuple[Rows, Reps]:
    """From the per-image scores a fold kept (:func:`pipeline.experiment.fold_eval.per_image_scores`): each of ``src``'s
    rows' ECE, and the I-AUROC of its rows under the other pooling rule, with replicates under ``w``."""
    rows: Rows = {}
    reps: Reps = {}
    for row in kept_rows(per_image, src):
        scores, val = per_image[f"{row}/{SCORE}"], per_image.get(f"{row}/{VAL_SCORE}")
        metrics, r = auroc_row(row, scores, labels, w) if split_pooled(row)[1] else ({}, {})
        if val is not None:
            ece, er = ece_row(row, probabilities(val, val_labels, scores), labels, w)
            metrics, r = {**metrics, **ece}, {**r, **er}
        rows[row] = metrics
        reps.update(r)
    return rows, reps


def loris_fold(p: RunPlan, fold: int, fo: FoldOutput) -> MethodFold:
    """LoRIS's rows under the other pooling rule and every LoRIS row's ECE on one fold and each held-out set,
    rescored from the scores the fold kept: no inference (none from a fold made before they were kept)."""
    f, arr, seed = p.data.folds[fold], p.data.arrays, p.cfg.seed
    val, test = p.data.index(f.val), p.data.index(f.test)
    patients = np.asarray(arr.patients)
    w = fold_weights(patients[test], seed, fold)
    rows, reps = rescored(p.main, fo.replicates, arr.labels[val], arr.labels[test], w)
    ext = [
        rescored(p.main, e.replicates, arr.labels[val], x.labels, fold_weights(x.patients, seed, None))
        for e, x in zip(fo.external, p.externals)
    ]
    return MethodFold(LORIS, {}, reps, [({}, r) for _, r in ext], extra=rows, external_extra=[m for m, _ in ext])


def peer_rows(
    name: str, out: PeerOutput, val_out: PeerOutput, labels: np.ndarray, val_labels: np.ndarray, w: np.ndarray
) -> tuple[Rows, Reps]:
    """The peer's ECE (row ``none/<name>``) and, for a prior peer, its row under the other pooling rule
    (``none/<name>@image``: its full map's whole-image mean) with I-AUROC and ECE."""
    own = f"{NO_PRIOR}/{name}"
    ece, reps = ece_row(own, probabilities(val_out.scores, val_labels, out.scores), labels, w)
    rows: Rows = {own: ece}
    whole, val_whole = (getattr(o, "image_scores", None) for o in (out, val_out))
    if whole is not None and val_whole is not None:
        row = f"{NO_PRIOR}/{pooled_row(name, 'image')}"
        auroc, ar = auroc_row(row, whole, labels, w)
        ece, er = ece_row(row, probabilities(val_whole, val_labels, whole), labels, w)
        rows[row] = {**auroc, **ece}
        reps.update({**ar, **er})
    return rows, reps


def score_set(
    ev: EvalSettings,
    name: str,
    out: PeerOutput,
    arrays: ScanArrays,
    validation: Validation | None,
    val: tuple[PeerOutput, np.ndarray],
    w: np.ndarray,
) -> tuple[Scored, Rows]:
    """:func:`score_part` with the peer's ECE, and its extra rows (:func:`peer_rows`); ``val``: the peer's
    output on the validation part and that part's labels."""
    metrics, reps = score_part(ev, name, out, arrays, validation, w)
    rows, more = peer_rows(name, out, val[0], arrays.labels, val[1], w)
    metrics.update(rows.pop(f"{NO_PRIOR}/{name}"))
    return (metrics, {**reps, **more}), rows


def figure_ids(fo: FoldOutput) -> list[int]:
    """The fold's distended figure cases (best, median, worst by LoRIS's per-image Dice), the scans every
    method shows in the comparison figure."""
    return list(dict.fromkeys(int(e.id) for e in fo.examples if e.label == 1))


def figure_maps(
    test: ScanArrays, maps: np.ndarray | None, ids: Sequence[int], threshold: float | None, kernel: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{id: (map, segmentation)}`` of the figure's scans; the segmentation at the val threshold."""
    from reconstruction.segment import segment

    if maps is None or threshold is None or not np.isfinite(threshold):
        return {}
    pos = {int(i): n for n, i in enumerate(test.ids)}
    return {i: (maps[pos[i]], segment(maps[pos[i]], threshold, kernel=kernel)) for i in ids if i in pos}


@dataclass(frozen=True)
class FoldBoxes:
    """The boxes a fold's prior-guided peers score in: on the validation and test parts, and per held-out set."""

    val: np.ndarray | None
    test: np.ndarray | None
    external: list[np.ndarray | None]

    @classmethod
    def none(cls, n_external: int) -> FoldBoxes:
        """No boxes, for peers without the prior."""
        return cls(None, None, [None] * n_external)

    @classmethod
    def of(cls, task: FoldTask) -> FoldBoxes:
        """The priors of the run's source (``detector.name``) as LoRIS's rows got them, through the same
        :func:`predict_priors`: the annotated boxes for ground truth, else the fold's detector (from the cache),
        each under the fold's policy and expansion."""
        cfg, arr, name = task.cfg, task.data.arrays, task.cfg.detector.name
        val, test = arr.subset(task.val), arr.subset(task.test)
        if registry.is_ground_truth(name):
            det = registry.instance(name)
        else:
            det, info = fit_detector(cfg, task.data, task.train, task.val, task.out / name)
            if not info.get("cached", True):  # a deterministic fit, but an expensive one, and worth knowing
                print(
                    f"WARNING: fold {task.fold}: the {name} detector was not in the model cache and was trained "
                    "again for the prior-guided peers' boxes",
                    file=sys.stderr,
                )
        policy = fold_policy(arr, task.train, cfg.detector.threshold, cfg.detector.train_classes)
        val_b, test_b, *ext = (
            predict_priors(det, a, policy, task.ev.expansion).boxes for a in (val, test, *task.externals)
        )
        return cls(val_b, test_b, list(ext))


def peer_fold(task: FoldTask, fo: FoldOutput, job: PeerJob, boxes: Callable[[], FoldBoxes]) -> MethodFold:
    """Fit (or load) the job's peer and score it on the fold's test part and on every held-out set; a
    prior-guided peer in ``boxes()``, the run's priors."""
    arr, ev, seed, name = task.data.arrays, task.ev, task.cfg.seed, job.peer.name
    peer, fit_info = fit_peer(job, arr)
    val, test = arr.subset(task.val), arr.subset(task.test)
    where = boxes() if isinstance(peer, PriorPeer) else FoldBoxes.none(len(task.externals))
    watch = Stopwatch()
    with watch("predict"):
        # prior-guided peers score in the boxes LoRIS's rows got and pool as LoRIS pools (score.inset),
        # so the table compares methods, not priors or pooling rules
        inset = task.cfg.score.inset
        val_out = predict_peer(peer, val.images, where.val, inset=inset)
        test_out = predict_peer(peer, test.images, where.test, inset=inset)
    validation = Validation(val, {name: val_out.maps}) if val_out.maps is not None else None
    w = fold_weights(test.patients, seed, task.fold)
    (metrics, reps), extra = score_set(ev, name, test_out, test, validation, (val_out, val.labels), w)
    external, external_extra = [], []
    for i, ext in enumerate(task.externals):  # one bootstrap draw per held-out set, shared by every fold's models
        with watch("predict"):
            ext_out = predict_peer(peer, ext.images, where.external[i], inset=inset)
        w = fold_weights(ext.patients, seed, None)
        scored, rows = score_set(ev, name, ext_out, ext, validation, (val_out, val.labels), w)
        external.append(scored)
        external_extra.append(rows)
    threshold = metrics.get("dice_val_threshold")
    figure = figure_maps(test, test_out.maps, figure_ids(fo), threshold, ev.kernel)
    n_images = len(val) + len(test) + sum(len(e) for e in task.externals)
    info = {"fit": fit_info, "predict_s": watch.seconds["predict"], "predict_images": n_images}
    return MethodFold(name, metrics, reps, external, figure, info, extra, external_extra)


def riad_figure(task: FoldTask, fo: FoldOutput) -> MethodFold:
    """RIAD's maps and segmentations of the figure's scans, from the fold's cached RIAD U-Net."""
    from reconstruction.infer import riad_reconstruct

    cfg, arr, ids = task.cfg, task.data.arrays, figure_ids(fo)
    metrics = fo.result.methods.get(RIAD, {})
    if not ids or not metrics:
        return MethodFold(RIAD, metrics, {})
    riad, _ = fit_unet(cfg, task.data, task.train, task.val, "riad")
    test = arr.subset(task.test)
    pos = np.array([int(np.flatnonzero(test.ids == i)[0]) for i in ids])
    sub = test.subset(pos)
    rec = riad_reconstruct(riad, sub.images, ks=cfg.riad.ks, maps=(RIAD,), device=task.ev.device, seed=cfg.seed)
    figure = figure_maps(sub, rec.maps[RIAD], ids, metrics.get("dice_val_threshold"), task.ev.kernel)
    return MethodFold(RIAD, metrics, {}, figure=figure)


# ----------------------------------------------------------------------------- the folds


def compare_fold(p: RunPlan, cs: Settings, fold: int, fo: FoldOutput, bar: Progress) -> dict[str, MethodFold]:
    """Every peer of ``cs`` (and RIAD's figure maps) on one fold, each resumed when already saved, and LoRIS's
    rescored rows (:func:`loris_fold`)."""
    fdir = p.out / "folds" / str(fold)
    task = FoldTask.plan(p.cfg, p.data, fold, fdir, p.externals)
    out: dict[str, MethodFold] = {}
    n_ext = len(p.externals)
    riad_key = f"riad-figure|{','.join(map(str, figure_ids(fo)))}"
    # a detector's priors are predicted once per fold, and only if a prior-guided peer still needs scoring
    boxes = functools.cache(lambda: FoldBoxes.of(task))
    ex = p.cfg.detector
    prior = "" if registry.is_ground_truth(p.main) else f"|prior={p.main}"  # ground truth: keys as before
    prior += f"|expand={ex.expand_up},{ex.expand_side}" if ex.expand_up or ex.expand_side else ""
    for name in ([RIAD] if RIAD in cs.methods else []) + cs.peers:
        bar.stage(fold, name)
        job = peer_job(p.cfg, task, name, cs.budget, cs.options.get(name)) if name != RIAD else None
        where = prior if job and isinstance(job.peer, PriorPeer) else ""
        key = f"{job.entry.name}{where}|external={n_ext}|{SAVED_AS}" if job else riad_key
        mf = load_method(fdir / PEER_DIR, name, key)
        if mf is None:
            mf = peer_fold(task, fo, job, boxes) if job else riad_figure(task, fo)
            save_method(fdir / PEER_DIR, mf, key)
        out[name] = mf
        bar.done()
    out[LORIS] = loris_fold(p, fold, fo)  # rescored from the fold's kept scores, not saved: it costs no inference
    return out


def _check_options(cs: Settings) -> None:
    stray = sorted(set(cs.options) - set(cs.peers))
    if stray:
        raise ValueError(f"peer options given for {', '.join(stray)}, which are not among the methods {cs.methods}")


def finished_settings(out: Path) -> dict[str, Any] | None:
    """``compare.json`` of the finished comparison in ``out``; None when ``out`` holds no finished run. The
    finished run of another command is refused: ``compare`` adds methods to its own folders only."""
    if not (out / "summary.json").is_file():
        return None
    command = json.loads((out / "summary.json").read_text()).get("command")
    if command != "compare" or not (out / "compare.json").is_file():
        raise RunDirError(
            f"{out} already holds a finished run (summary.json) that is not a comparison; choose another --out"
        )
    return dict(json.loads((out / "compare.json").read_text()))


def added_settings(out: Path, saved: Mapping[str, Any], cs: Settings, cfg: Config) -> Settings:
    """``cs`` added to the finished comparison in ``out`` (``saved``: its ``compare.json``): its methods, then
    the new ones. Refused, naming what differs, when the config (data, folds, budgets, scoring...), the
    peers' budget or the options of a method already there differ, or when RIAD is new (it trains inside
    LoRIS's folds, which are finished)."""
    now = cs.to_dict()
    old_config = {k: v for k, v in backfill(yaml.safe_load((out / "config.yaml").read_text())).items() if k != "run"}
    made = replace(cfg, riad=replace(cfg.riad, enabled=RIAD in saved["methods"]))  # RIAD as the folds had it
    diff = config_differences(old_config, {k: v for k, v in run_config(made).items() if k != "run"})
    if saved["budget"] != now["budget"]:
        diff.append(f"the peers' budget ({saved['budget']!r} vs {now['budget']!r})")
    old_options = saved.get("options", {})
    diff += [
        f"options of {m} ({old_options.get(m, {})!r} vs {now['options'][m]!r})"
        for m in saved["methods"]
        if m in now["options"] and now["options"][m] != old_options.get(m, {})
    ]
    if RIAD in cs.methods and RIAD not in saved["methods"]:
        diff.append("riad: it trains inside LoRIS's folds, which are finished")
    if diff:
        raise RunDirError(
            f"{out} holds a finished comparison made otherwise, so methods cannot be added to it: "
            f"{'; '.join(diff)}; use the same settings, or another --out"
        )
    methods = parse_methods([*saved["methods"], *cs.methods])
    return Settings(methods, cs.budget, {**old_options, **now["options"]})


def compare_plan(cfg: Config, out: Path, adding: bool) -> RunPlan:
    """:func:`pipeline.experiment.run.plan` of the comparison; when ``adding`` to a finished one, a refusal there means
    that the data's content changed since (the config was checked before)."""
    try:
        return plan(cfg, out, [cfg.detector.name], "compare")
    except RunDirError as exc:
        if not adding:
            raise
        raise RunDirError(
            f"{out}: the data or a held-out set changed since this comparison was made (their content "
            f"differs), so methods cannot be added to it; use another --out"
        ) from exc


def pool_paths(cfg: Config, pool: Sequence[str | Path]) -> list[str]:
    """The held-out paths of ``cfg`` that ``pool`` names (compared resolved); refused for one not held out."""
    held = {str(Path(x).resolve()): x for x in cfg.evaluation.external_paths}
    missing = [str(x) for x in pool if str(Path(x).resolve()) not in held]
    if missing:
        raise ValueError(
            f"--pool-with {', '.join(missing)}: not a held-out set of this comparison (give it to --external)"
        )
    return [held[str(Path(x).resolve())] for x in pool]


def execute_compare(
    cfg: Config,
    out: Path,
    methods: str | Sequence[str],
    *,
    budget: str | Budget | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    pool: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Run, resume or add to the comparison in ``out`` and write every output; returns the summary.

    LoRIS's prior source is ``cfg.detector.name``; RIAD trains only when asked for. ``budget`` (default:
    named like the profile) and ``options`` (``{peer: {option: value}}``) set the peers. On a finished
    comparison made with the same settings the new methods are added (the others are read back from its
    folders) and every table is written again with all of them (:func:`added_settings`). ``pool`` names
    held-out sets (among ``cfg.evaluation.external_paths``) whose differences are pooled with the test folds'.
    """
    out = Path(out)
    pooled_with = pool_paths(cfg, pool)
    cs = Settings(parse_methods(methods), budget or PEER_BUDGETS[cfg.profile], dict(options or {}))
    saved = finished_settings(out)
    if saved is not None:
        cs = added_settings(out, saved, cs, cfg)
    _check_options(cs)
    cfg = replace(cfg, riad=replace(cfg.riad, enabled=RIAD in cs.methods))
    watch = Stopwatch()
    with adding_to(out) if saved is not None else contextlib.nullcontext(out), run_lock(out):
        with watch("total"):
            set_threads(cfg.threads)
            p = compare_plan(cfg, out, saved is not None)
            write_json(p.out / "compare.json", json_safe(cs.to_dict()))
            outputs, resumed = run_folds(p)
            bar = Progress(len(p.fold_ids), len(cs.peers) + int(RIAD in cs.methods), cfg.progress)
            try:
                per_fold = [compare_fold(p, cs, f, fo, bar) for f, fo in zip(p.fold_ids, outputs)]
            finally:
                bar.close()
        summary = summarise(p, cs, outputs, per_fold, pooled_with)
        summary["timing"] = {"total_s": watch.seconds["total"], "resumed_folds": resumed, **summary["timing"]}
        if saved is not None:
            summary["added_methods"] = [m for m in cs.methods if m not in saved["methods"]]
        write_compare_report(p, cs, outputs, per_fold, summary)
    return summary


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``compare``'s own options (``pipeline.__main__`` adds the common ones: --data, --profile, --set, ...)."""
    choices = method_choices()
    parser.add_argument(
        "--methods",
        default=",".join(choices),
        help=f"comma-separated, from {', '.join(choices)} (default: all); loris is always included",
    )
    parser.add_argument(
        "--detector", choices=registry.names(), default=registry.ground_truth(), help="LoRIS's prior source"
    )
    parser.add_argument("--folds", help="comma-separated fold indices, e.g. 0,2 (default: all)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/compare-<detector>-<profile>-<time>)")
    parser.add_argument(
        "--external",
        type=Path,
        action="append",
        help="held-out dataset folder: every fold's models also score all of it; repeatable",
    )
    parser.add_argument(
        "--pool-with",
        type=Path,
        action="append",
        default=[],
        help="a held-out set (also given to --external) whose paired I-AUROC differences are pooled with the "
        "test folds' in pooled.md (stratified patient-cluster interval); repeatable",
    )


def cli(args: argparse.Namespace, cfg: Config) -> int:
    """``compare`` once its config is resolved: check the methods first, run, print the table."""
    methods = parse_methods(args.methods)
    out = Path(args.out) if args.out else default_run_dir(cfg, "compare")
    summary = execute_compare(cfg, out, methods, pool=args.pool_with)
    print("\n".join(summary_lines(summary, out)))
    return 0
