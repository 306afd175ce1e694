"""Each command end to end on a tiny phantom with the quick profile (in-process, offline)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import cv2
import pytest

from pipeline.__main__ import main
from pipeline.serve.predict import decode_mask
from tests.helpers import TINY_PHANTOM, pinned_environment, set_args

SUMMARY_KEYS = {"detector", "data", "profile", "folds", "reconstruction", "riad", "detection", "timing"}
METRIC_KEYS = {"i_auroc", "p_auroc", "dice_oracle", "dice_val"}
TIMING_KEYS = {"total_s", "detector_fit_s", "unet_fit_s", "inference_images_per_s"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loris-cache")


def tiny(cache: Path) -> list[str]:
    sets = [
        *TINY_PHANTOM,
        "unet.epochs=1",
        "riad.epochs=1",
        "riad.ks=[2,8]",
        f"cache_dir={cache / 'models'}",
        "threads=2",
        "detector.options={epochs: 1, imgsz: 64, batch: 8}",
    ]
    return set_args(sets)


def ablate_args(out: Path, cache: Path, external: list[Path]) -> list[str]:
    """``ablate`` of GT and YOLOv5u priors on folds 0 and 1 of the tiny phantom, scoring ``external`` too."""
    ext = [a for e in external for a in ("--external", str(e))]
    fixed = ["ablate", "--detectors", "gt,yolov5", "--profile", "quick", "--folds", "0,1"]
    return [*fixed, *ext, "--out", str(out), "--no-progress"] + tiny(cache)


@pytest.fixture(autouse=True)
def _cache_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORIS_CACHE", str(cache))


# The quick profile's figures per prior source, pinned so that any change to the numbers is deliberate and
# shows in the diff. Regenerate with LORIS_REGOLD=1; exact where torch and the CPU kernels match.
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "quick_summary.json"


def _golden_figures(summary: dict) -> dict[str, float]:
    recon = summary["reconstruction"]
    out = {f"{m}/{k}": v["mean"] for m, per in recon.items() for k, v in per.items() if isinstance(v, dict)}
    det = {k: v["mean"] for k, v in (summary.get("detection") or {}).items() if isinstance(v, dict)}
    out.update({f"detection/{k}": det[k] for k in ("precision", "map50", "map75") if det.get(k) is not None})
    return {k: round(float(v), 6) for k, v in sorted(out.items()) if v is not None}


def _assert_golden(summary: dict, detector: str) -> None:
    got = _golden_figures(summary)
    doc = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("LORIS_REGOLD"):
        doc.update({"environment": list(pinned_environment()), detector: got})
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        return
    exact = tuple(doc["environment"]) == pinned_environment()
    assert set(got) == set(doc[detector])
    for key, value in doc[detector].items():
        assert got[key] == pytest.approx(value, abs=1e-6 if exact else 0.05, nan_ok=True), key


def _assert_run_outputs(out: Path, detector: str) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), set(summary)
    assert summary["detector"] == detector and summary["profile"] == "quick" and summary["folds"] == [0]
    for name in ("msgmsd", "dd", "gmsd", "ssim"):
        assert METRIC_KEYS <= set(summary["reconstruction"][name])
        assert {"mean", "std"} <= set(summary["reconstruction"][name]["i_auroc"])
    assert TIMING_KEYS <= set(summary["timing"])
    for name in (
        "table1.md",
        "table2.md",
        "table1.csv",
        "per_image.csv",
        "report.html",
        "config.yaml",
        "versions.json",
        "commit.txt",
    ):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"#:]+)"', html):
        assert (out / ref).exists(), ref  # the page links only files that exist
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert rows and {"id", "patient", "fold", "label", "score_control_height"} <= set(rows[0])
    # prior-only controls and patient-clustered intervals reach every output
    assert set(summary["controls"]["gt"]) == {"control_height", "control_area"}
    cl = summary["clustered"]
    assert cl["n_boot"] == 2000 and cl["best_control"]["gt"] in ("gt/control_height", "gt/control_area")
    iv = cl["rows"][f"{detector}/msgmsd"]["i_auroc"]["pooled"]
    assert iv["low"] <= iv["estimate"] <= iv["high"]
    assert iv["estimate"] == pytest.approx(summary["reconstruction"]["msgmsd"]["i_auroc"]["mean"])
    table1 = (out / "table1.md").read_text()
    assert "Prior only: box height" in table1 and "vs best prior-only control" in table1 and " [" in table1
    assert "Prior only" in html and (out / "differences.md").is_file()
    return summary


def test_run_gt_then_resume_and_refuse(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "run"
    assert (
        main(["run", "--detector", "gt", "--profile", "quick", "--out", str(out), "--no-progress"] + tiny(cache)) == 0
    )
    summary = _assert_run_outputs(out, "gt")
    _assert_golden(summary, "gt")
    assert summary["timing"]["unet_fit_s"] > 0
    # a killed run: the fold is kept, the summary missing -> the rerun resumes without retraining
    (out / "summary.json").unlink()
    assert (
        main(["run", "--detector", "gt", "--profile", "quick", "--out", str(out), "--no-progress"] + tiny(cache)) == 0
    )
    again = json.loads((out / "summary.json").read_text())
    assert again["reconstruction"]["msgmsd"]["i_auroc"] == summary["reconstruction"]["msgmsd"]["i_auroc"]
    # a finished run is never overwritten
    assert (
        main(["run", "--detector", "gt", "--profile", "quick", "--out", str(out), "--no-progress"] + tiny(cache)) == 2
    )


def test_unet_cache_is_reused_across_runs(tmp_path: Path, cache: Path) -> None:
    args = ["run", "--detector", "gt", "--profile", "quick", "--no-progress"] + tiny(cache)
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["timing"]["unet_fit_s"] == 0.0  # every U-Net came from the cache
    assert b["fold_info"][0]["unet"]["cached"] is True


def test_run_yolov5(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "yolo"
    assert (
        main(["run", "--detector", "yolov5", "--profile", "quick", "--out", str(out), "--no-progress"] + tiny(cache))
        == 0
    )
    summary = _assert_run_outputs(out, "yolov5")
    assert {"precision", "map50", "map75", "fallbacks"} <= set(summary["detection"])
    _assert_golden(summary, "yolov5")
    assert (out / "folds" / "0" / "yolov5" / "test_predictions.coco.json").is_file()


def test_run_codetr(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "codetr"
    sets = tiny(cache)[:-2] + ["--set", "detector.options={train: {epochs: 1, batch_size: 4}, image_size: 64}"]
    assert main(["run", "--detector", "codetr", "--profile", "quick", "--out", str(out), "--no-progress"] + sets) == 0
    summary = _assert_run_outputs(out, "codetr")
    assert {"precision", "map50", "map75", "fallbacks"} <= set(summary["detection"])
    _assert_golden(summary, "codetr")


def test_ablate(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ablate"
    assert (
        main(
            ["ablate", "--detectors", "gt,yolov5", "--profile", "quick", "--out", str(out), "--no-progress"]
            + tiny(cache)
        )
        == 0
    )
    table2 = (out / "table2.md").read_text()
    assert "GT" in table2 and "YOLOv5u" in table2 and "vs GT" in table2
    rows = {r["name"]: r for r in json.loads((out / "table2.json").read_text())["rows"] if r["source"] == "ours"}
    det = rows["YOLOv5u + refiner"]["metrics"]
    # detection figures and the detector-vs-GT gap carry patient-clustered intervals too
    assert det["map50"]["ci_low"] <= det["map50"]["mean"] + 1e-9 or det["map50"]["ci_low"] is None
    assert "ci_low" in det["map50"] and "ci_low" in det["gap_i_auroc"]
    summary = json.loads((out / "summary.json").read_text())
    # The paired test of detector against ground-truth priors, on the same test images.
    test = summary["prior_comparison"]["yolov5"]
    assert test["reference"] == "gt" and test["folds"] == [0] and test["ci_low"] <= test["diff"] <= test["ci_high"]
    i_auroc = summary["priors"]
    assert test["diff"] == pytest.approx(i_auroc["yolov5"]["i_auroc"]["mean"] - i_auroc["gt"]["i_auroc"]["mean"])
    assert "yolov5 priors vs gt" in capsys.readouterr().out
    # per detector, not only the first source's count
    assert set(summary["fallbacks_by_detector"]) == {"yolov5"}
    assert summary["detection"]["fallbacks"] == summary["fallbacks_by_detector"]["yolov5"]
    assert summary["timing"]["resumed_folds"] == 0
    (out / "summary.json").unlink()  # as if stopped after its fold finished: the rerun resumes it
    assert (
        main(
            ["ablate", "--detectors", "gt,yolov5", "--profile", "quick", "--out", str(out), "--no-progress"]
            + tiny(cache)
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["timing"]["resumed_folds"] == 1


def test_ablate_with_external_test_sets(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scans.phantom import generate_dataset

    exts = [
        generate_dataset(tmp_path / name, n_images=20, n_distended=8, n_patients=8, size=64, seed=seed, progress=False)
        for name, seed in (("held-out-a", 11), ("held-out-b", 12))
    ]
    out = tmp_path / "ablate-ext"
    assert main(ablate_args(out, cache, exts)) == 0
    main_summary = json.loads((out / "summary.json").read_text())
    assert [e["report"] for e in main_summary["external"]] == ["external/held-out-a", "external/held-out-b"]
    for i, ext in enumerate(exts):
        d = out / "external" / ext.name
        summary = json.loads((d / "summary.json").read_text())
        assert summary["images"] == 20 and summary["distended"] == 8 and summary["folds"] == [0, 1]
        test = summary["prior_comparison"]["yolov5"]
        assert test["test_images"] == "shared" and test["folds"] == [0, 1] and test["n_pos"] == 8
        rows = list(csv.DictReader(open(d / "per_image.csv")))
        assert len(rows) == 20 * 2 * 2  # every image, by each fold's models, with each prior source
        assert {r["fold"] for r in rows} == {"0", "1"} and "YOLOv5u" in (d / "table2.md").read_text()
        assert main_summary["external"][i]["prior_comparison"]["yolov5"]["se"] == pytest.approx(test["se"])
        diff = summary["clustered"]["differences"]
        assert any(x["a"] == "yolov5/msgmsd" and x["b"] == "gt/msgmsd" for x in diff)
        assert set(summary["controls"]) == {"gt", "yolov5"}
    assert "20 images]" in capsys.readouterr().out
    from evaluation.claims import main as claims

    assert claims([str(out)]) == 0  # the paper's claims, read from the finished run
    text = capsys.readouterr().out
    assert "held-out held-out-a" in text and "| YOLOv5u priors close to GT: ΔI-AUROC | +" in text.replace("| -", "| +")
    # a resume must score the same held-out sets
    (out / "summary.json").unlink()
    assert main(ablate_args(out, cache, exts[:1])) == 2


def test_external_set_must_be_held_out(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.shared.data import load_data, load_external
    from scans.phantom import generate_dataset

    own = generate_dataset(tmp_path / "own", n_images=24, n_distended=8, n_patients=8, size=64, seed=3, progress=False)
    cfg = load_config(None, "quick", ["image_size=64", "folds=3"], {"data": str(own)})
    data = load_data(cfg)
    with pytest.raises(ValueError, match="run's own dataset"):
        load_external(own, data, cfg.image_size, cfg.frame)
    copy = shutil.copytree(own, tmp_path / "copy")  # same images under another path
    with pytest.raises(ValueError, match="24 of its 24 images are also in the run's dataset"):
        load_external(copy, data, cfg.image_size, cfg.frame)
    other = generate_dataset(
        tmp_path / "other", n_images=16, n_distended=4, n_patients=8, size=64, seed=4, progress=False
    )
    assert len(load_external(other, data, cfg.image_size, cfg.frame)) == 16


def _scan_folder(root: Path, phantom: Path) -> Path:
    from tests.helpers import write_dicom

    folder = root / "incoming"
    (folder / "sub").mkdir(parents=True)
    pngs = sorted((phantom / "images").glob("*.png"))[:3]
    for p in pngs:
        shutil.copy(p, folder / p.name)
    img = cv2.imread(str(pngs[0]), cv2.IMREAD_GRAYSCALE)
    write_dicom(folder / "scan.dcm", img)
    shutil.copy(pngs[1], folder / "sub" / "deep.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_train_then_predict_with_resume(tmp_path: Path, cache: Path) -> None:
    model = tmp_path / "model"
    assert (
        main(
            ["train", "--detector", "yolov5", "--profile", "quick", "--out", str(model), "--no-progress"] + tiny(cache)
        )
        == 0
    )
    doc = json.loads((model / "bundle.json").read_text())
    assert {"threshold", "operating_point"} <= set(doc["score"]) and "threshold" in doc["segmentation"]
    # The default prior is the refined detector: its refiner travels in the bundle.
    assert (model / "detector" / "refined.json").is_file() and (model / "detector" / "refiner" / "refiner.pt").is_file()
    phantom = Path(doc["config"]["data"] or next((cache / "phantom").iterdir()))
    # A bundle uses only the prior, so it refines only each scan's top box (the unit tests show
    # that this leaves the prior unchanged).
    from pipeline.serve.bundle import Bundle

    assert Bundle.load(model, device="cpu").detector.top_k == 1
    folder = _scan_folder(tmp_path, phantom)
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model), "--input", str(folder), "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    errors = {r["file"]: r["reason"] for r in csv.DictReader(open(out / "errors.csv"))}
    expected = sorted(["scan.dcm"] + [p.name for p in folder.glob("*.png") if p.name != "broken.png"])
    assert sorted(r["file"] for r in rows) == expected
    assert set(errors) == {"broken.png", "notes.txt"} and "unsupported" in errors["notes.txt"]
    for r in rows:
        assert r["verdict"] in ("distended", "not distended") and r["box_source"] in ("detector", "fallback")
        assert r["overlay"] == ""  # overlays are opt-in
        assert decode_mask(r).shape == (int(r["height"]), int(r["width"]))
    # resume: drop the last row as if killed mid-run; the rerun processes only that file
    lines = (out / "predictions.csv").read_text().splitlines()
    (out / "predictions.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert (
        main(
            [
                "predict",
                "--model",
                str(model),
                "--input",
                str(folder),
                "--out",
                str(out),
                "--no-progress",
                "--recursive",
            ]
        )
        == 0
    )
    rows2 = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows2) == len(rows) + 1 and any(r["file"] == "sub/deep.png" for r in rows2)
    assert len({r["file"] for r in rows2}) == len(rows2)  # nothing processed twice
    files = {p.resolve() for p in tmp_path.rglob("*") if p.is_file()}
    assert all(
        out.resolve() in f.parents or model.resolve() in f.parents or folder.resolve() in f.parents for f in files
    )


def test_relative_data_folder_for_run_and_train(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--data ph`` from the folder holding ``ph/`` is the folder every newcomer types (was '<cwd>/ph/ph/...')."""
    from scans.phantom import default_dataset

    source = default_dataset(n_images=48, n_distended=16, n_patients=16, size=64, seed=0, progress=False)
    shutil.copytree(source, tmp_path / "ph")
    monkeypatch.chdir(tmp_path)
    common = ["--profile", "quick", "--data", "ph", "--no-progress", *tiny(cache)]
    assert main(["run", "--detector", "gt", "--out", "run", *common]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()
    assert main(["train", "--detector", "yolov5", "--out", "model", *common]) == 0
    assert (tmp_path / "model" / "bundle.json").is_file()
