"""``predict`` on real-world inputs: DICOM crops and cine frames, no PHI in outputs, DICOM results,
the review page, ONNX export and the Ray engine (in-process, offline). Hostile files (links, loops, huge
images), refusals and damaged bundles are in the hostile-input corpus (tests/integration/test_hostile_corpus.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.__main__ import main
from pipeline.serve.predict import decode_mask
from tests.helpers import train_quick_bundle, write_dicom

PHI_NAME, PHI_ID = "Doe^Jane", "PHI-98765"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A bundle trained once for the module (quick profile, tiny phantom, YOLOv5u without the refiner)
    and one phantom scan."""
    bundle, cache = train_quick_bundle(tmp_path_factory)
    png = sorted((cache / "phantom").rglob("*.png"))[0]
    return bundle, cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)


@pytest.fixture
def model(trained: tuple[Path, np.ndarray]) -> Path:
    return trained[0]


@pytest.fixture
def scan(trained: tuple[Path, np.ndarray]) -> np.ndarray:
    return trained[1]


def _identify(path: Path, study: bool = True) -> None:
    """Give a DICOM patient tags (and the study and series UIDs a PACS files it under)."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID, ds.Modality = PHI_NAME, PHI_ID, "US"
    if study:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    if int(ds.get("NumberOfFrames", 1)) > 1:  # a cine scan has the multi-frame SOP class
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UltrasoundMultiFrameImageStorage
    ds.save_as(path)


def _dicom_with_regions(path: Path, scan: np.ndarray) -> tuple[int, int, int, int]:
    """A screenshot-like DICOM: the scan pasted into a wider frame with a bright side panel, PHI tags,
    and a Sequence of Ultrasound Regions naming the scan's region; returns the crop (half-open)."""
    import pydicom
    from pydicom.dataset import Dataset

    h, w = scan.shape
    frame = np.zeros((h + 20, w + 50), np.uint8)
    x0, y0 = 10, 12
    frame[y0 : y0 + h, x0 : x0 + w] = scan
    frame[:, w + 20 :] = 230  # a panel of text and rulers
    write_dicom(path, frame)
    _identify(path)
    ds = pydicom.dcmread(path)
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = x0, y0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = x0 + w - 1, y0 + h - 1
    ds.SequenceOfUltrasoundRegions = [region]
    ds.save_as(path)
    return (x0, y0, x0 + w, y0 + h)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _predict(model: Path, folder: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--model", str(model), "--input", str(folder), "--out", str(out), "--no-progress", *extra])


def _page(out: Path) -> Path:
    """The review page of an output folder (its one HTML file)."""
    (page,) = out.glob("*.html")
    return page


def test_dicom_crop_frames_phi_dicom_out_and_review(model: Path, scan: np.ndarray, tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    folder = tmp_path / "in"
    folder.mkdir()
    crop = _dicom_with_regions(folder / "screen.dcm", scan)
    cine = np.stack([scan, scan[::-1], np.roll(scan, 5, axis=1)])
    write_dicom(folder / "cine.dcm", cine)
    _identify(folder / "cine.dcm")
    write_dicom(folder / "nouids.dcm", scan)
    _identify(folder / "nouids.dcm", study=False)
    cv2.imwrite(str(folder / "plain.png"), scan)
    out = tmp_path / "out"
    assert _predict(model, folder, out, "--frames", "all", "--dicom-out", "seg,sr,sc", "--overlays") == 0

    rows = _rows(out / "predictions.csv")
    assert sorted((r["file"], r["frame"]) for r in rows) == [
        ("cine.dcm", "0"),
        ("cine.dcm", "1"),
        ("cine.dcm", "2"),
        ("nouids.dcm", "0"),
        ("plain.png", "0"),
        ("screen.dcm", "0"),
    ]
    by = {(r["file"], r["frame"]): r for r in rows}
    # the regions crop is recorded, and box and mask are in the original (uncropped) pixels
    scr = by[("screen.dcm", "0")]
    h, w = scan.shape
    assert tuple(int(scr[k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1")) == crop
    assert scr["crop_source"] == "region 0" and (int(scr["width"]), int(scr["height"])) == (w + 50, h + 20)
    box = [float(scr[k]) for k in ("box_x1", "box_y1", "box_x2", "box_y2")]
    assert crop[0] <= box[0] < box[2] <= crop[2] and crop[1] <= box[1] < box[3] <= crop[3]
    mask = decode_mask(scr)
    overlay = cv2.imread(str(out / scr["overlay"]))
    assert mask.shape == (h + 20, w + 50) and overlay.shape == (h + 20, w + 50, 3)
    assert not mask[:, crop[2] :].any() and not mask[: crop[1]].any()  # nothing outside the crop
    assert scr["sop_instance_uid"] == str(pydicom.dcmread(folder / "screen.dcm").SOPInstanceUID)
    plain = by[("plain.png", "0")]
    assert plain["crop_source"] == "none" and plain["sop_instance_uid"] == ""
    assert (plain["crop_x1"], plain["crop_y1"]) == (str(w), str(h))
    # plain.png is the crop's own pixels: the same prediction, shifted by the crop's corner
    assert scr["score"] == plain["score"]
    shifted = [float(plain[k]) + crop[i % 2] for i, k in enumerate(("box_x1", "box_y1", "box_x2", "box_y2"))]
    np.testing.assert_allclose(box, shifted, atol=0.11)
    plain_mask = decode_mask(plain)
    np.testing.assert_array_equal(mask[crop[1] : crop[3], crop[0] : crop[2]], plain_mask)
    # cine: one row per frame, each with its own output files
    assert len({by[("cine.dcm", f)]["overlay"] for f in "012"}) == 3

    # --dicom-out: a SEG, an SR and an SC per DICOM frame, referencing the source
    seg_path = out / scr["dicom"].split(";")[0]
    assert seg_path.name.endswith(".seg.dcm") and seg_path.parent == out / "dicom"
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG" and seg.Rows == h + 20 and seg.Columns == w + 50
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == scr["sop_instance_uid"]
    np.testing.assert_array_equal(seg.pixel_array.astype(bool), mask)
    assert len(by[("cine.dcm", "2")]["dicom"].split(";")) == 3
    # a source without study and series UIDs cannot be referenced: listed, scored all the same
    errors = _rows(out / "errors.csv")
    assert [(e["file"], e["frame"]) for e in errors] == [("nouids.dcm", "0")]
    assert errors[0]["reason"].startswith("dicom-out:") and by[("nouids.dcm", "0")]["dicom"] == ""

    # a rerun finds every frame done
    assert _predict(model, folder, out, "--frames", "all", "--dicom-out", "seg,sr,sc", "--overlays") == 0
    assert len(_rows(out / "predictions.csv")) == len(rows) and len(_rows(out / "errors.csv")) == 1

    # review page, and no patient tag in any CSV, PNG or HTML output
    page = _page(out).read_text()
    assert "screen.dcm" in page and "plain.png" in page
    for p in out.rglob("*"):
        if p.is_file() and "dicom" not in p.relative_to(out).parts:
            data = p.read_bytes()
            assert PHI_NAME.encode() not in data and PHI_ID.encode() not in data and b"Doe" not in data, p


def test_export_onnx_subcommand(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(model), "--out", str(out), "--no-detector"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert (out / info["loris"]["file"]).is_file() and info["detector"]["note"] == "not requested"


def test_ray_engine_writes_what_the_local_engine_writes(
    model: Path, scan: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ray", "pyarrow"):  # not imported here: predict_ray reads its loopback switch on the first import
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))  # Ray's session files go under the LoRIS cache
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"s{i}.png"), np.roll(scan, 3 * i, axis=1))
    (folder / "notes.txt").write_text("not an image")
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert _predict(model, folder, local, "--batch-size", "2") == 0
    assert _predict(model, folder, ray_out, "--batch-size", "2", "--engine", "ray") == 0

    def table(out: Path) -> dict[str, dict[str, str]]:
        return {r["file"]: r for r in _rows(out / "predictions.csv")}

    a, b = table(local), table(ray_out)
    assert sorted(a) == sorted(b) == [f"s{i}.png" for i in range(5)]
    for f in a:
        assert abs(float(a[f]["score"]) - float(b[f]["score"])) < 1e-4 and a[f]["overlay"] == b[f]["overlay"] == ""
        np.testing.assert_array_equal(decode_mask(a[f]), decode_mask(b[f]))
    assert [e["file"] for e in _rows(ray_out / "errors.csv")] == ["notes.txt"]
    assert _page(ray_out).is_file() and not (tmp_path / "home").exists()
    # sharded, with overlays, and resumed: the actors write the overlay files, the driver the rows
    shard = tmp_path / "ray-shard"
    assert _predict(model, folder, shard, "--engine", "ray", "--shard", "1/2", "--overlays") == 0
    first = _rows(shard / "predictions.csv")
    assert first and {r["file"] for r in first} < set(a) and all((shard / r["overlay"]).is_file() for r in first)
    assert json.loads((shard / "predict.json").read_text())["shard"] == {"n": 2, "k": [1]}
    (shard / "predictions.csv").write_text("".join((shard / "predictions.csv").read_text().splitlines(True)[:-1]))
    assert _predict(model, folder, shard, "--engine", "ray", "--shard", "1/2", "--overlays") == 0
    assert sorted(r["file"] for r in _rows(shard / "predictions.csv")) == sorted(r["file"] for r in first)
