"""DICOM outputs (SEG, SR, overlay SC): pixels, values, references, UIDs and PHI, read back with pydicom/highdicom."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")

from pydicom import Dataset, dcmread  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from pipeline.serve.dicom_out import PATIENT_STUDY_KEPT, Prediction, derived_uid, write_dicom_outputs  # noqa: E402

ROWS, COLS = 48, 64
PHI_DROPPED = ("PatientAge", "PatientWeight", "PatientComments", "OtherPatientNames", "StudyDescription")
NEVER_COPIED = ("InstitutionName", "OperatorsName", "DeviceSerialNumber", "SequenceOfUltrasoundRegions")


def _source(kind: str) -> Dataset:
    """A source scan: ``us8`` (8-bit US), ``ct16`` (16-bit with a frame of reference), ``usreg`` (US with
    regions, RGB) or ``cine`` (3-frame US), each with patient/study identifiers to be filtered."""
    frames = 3 if kind == "cine" else 1
    cls = {"ct16": CTImageStorage, "cine": UltrasoundMultiFrameImageStorage}.get(kind, UltrasoundImageStorage)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = cls
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "PHI-123", "19800101", "F"
    ds.PatientAge, ds.PatientWeight, ds.PatientComments, ds.OtherPatientNames = "044Y", "70", "secret", "Roe^J"
    ds.StudyDescription, ds.InstitutionName, ds.OperatorsName, ds.DeviceSerialNumber = "left knee", "H", "Op", "SN1"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
        "20240102",
        "1010",
        "7",
        "A9",
        "",
    )
    ds.Modality = "CT" if kind == "ct16" else "US"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = ROWS, COLS
    color = kind == "usreg"
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = "RGB" if color else "MONOCHROME2"
    if color:
        ds.PlanarConfiguration = 0
    bits = 16 if kind == "ct16" else 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if kind == "ct16":
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = 0, 1, 120
    if kind == "usreg":
        region = Dataset()
        region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 8, 4
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 55, 43
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = region.PhysicalDeltaY = 0.01
        ds.SequenceOfUltrasoundRegions = [region]
    dtype = np.uint16 if bits == 16 else np.uint8
    shape = (frames, ROWS, COLS, 3) if color else (frames, ROWS, COLS)
    ds.PixelData = np.random.default_rng(0).integers(0, 200, shape).astype(dtype).tobytes()
    return ds


def _prediction(frame: int = 0, score: float = 0.8, box: Any = (5.0, 10.0, 40.0, 30.0)) -> Prediction:
    mask = np.zeros((ROWS, COLS), bool)
    mask[12:28, 7:38] = True
    mask[20, 3] = True
    return Prediction(mask, score, 0.5, box, "loris-test", "1.2", frame=frame, box_source="detector")


def _items(ds: Dataset) -> list[Dataset]:
    """Every SR content item, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out += [item, *_items(item)]
    return out


def _named(ds: Dataset, code: str) -> list[Dataset]:
    return [i for i in _items(ds) if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeValue == code]


@pytest.mark.parametrize("kind", ["us8", "ct16", "usreg", "cine"])
def test_seg_sr_sc_read_back(tmp_path: Path, kind: str) -> None:
    src = _source(kind)
    frame = 2 if kind == "cine" else 0
    pred = _prediction(frame)
    overlay = np.random.default_rng(1).integers(0, 255, (ROWS, COLS, 3)).astype(np.uint8)
    paths = write_dicom_outputs(src, pred, tmp_path, "scan", kinds=("seg", "sr", "sc"), overlay_bgr=overlay)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.sc.dcm", "scan.seg.dcm", "scan.sr.dcm"]

    seg = hd.seg.segread(paths["seg"])
    assert seg.SegmentationType == "BINARY" and seg.number_of_segments == 1
    desc = seg.SegmentSequence[0]
    assert desc.SegmentLabel == "Joint effusion/distension"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "41699000"
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    np.testing.assert_array_equal(seg.pixel_array.reshape(ROWS, COLS).astype(bool), pred.mask)
    assert (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID) in seg.get_source_image_uids()
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (src.SOPInstanceUID, src.SOPClassUID)
    if kind == "cine":
        assert int(ref.ReferencedFrameNumber) == frame + 1

    sr = dcmread(paths["sr"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    (score,) = _named(sr, "LORIS-SCORE")
    assert float(score.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.8)
    (thr,) = _named(sr, "122411")
    assert float(thr.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.5)
    verdicts = [i for i in _named(sr, "41699000") if i.ValueType == "CODE"]
    assert [v.ConceptCodeSequence[0].CodeValue for v in verdicts] == ["52101004"]  # Present
    (scoord,) = [i for i in _items(sr) if i.ValueType == "SCOORD"]
    assert scoord.GraphicType == "POLYLINE"
    pts = np.asarray(scoord.GraphicData, float).reshape(-1, 2)
    np.testing.assert_allclose(pts, [[5, 10], [40, 10], [40, 30], [5, 30], [5, 10]])
    img = scoord.ContentSequence[0].ReferencedSOPSequence[0]
    assert img.ReferencedSOPInstanceUID == src.SOPInstanceUID
    if kind == "cine":
        assert int(img.ReferencedFrameNumber) == frame + 1
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID

    sc = dcmread(paths["sc"])
    assert sc.PhotometricInterpretation == "RGB"
    np.testing.assert_array_equal(sc.pixel_array, overlay[..., ::-1])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID

    for path in paths.values():
        out = dcmread(path)
        assert out.StudyInstanceUID == src.StudyInstanceUID
        assert out.SeriesInstanceUID != src.SeriesInstanceUID and out.SOPInstanceUID != src.SOPInstanceUID
        assert (out.PatientID, str(out.PatientName)) == ("PHI-123", "Doe^Jane")  # files it with its source
        leaked = [k for k in PHI_DROPPED + NEVER_COPIED if k in out and out.get(k) == src.get(k)]
        assert not leaked, f"{path.name} copies {leaked}"


def test_uids_are_deterministic_per_source_and_model(tmp_path: Path) -> None:
    src = _source("us8")
    a = write_dicom_outputs(src, _prediction(), tmp_path / "a", "s")
    b = write_dicom_outputs(src, _prediction(), tmp_path / "b", "s")
    other = Prediction(**{**_prediction().__dict__, "model_version": "1.3"})
    c = write_dicom_outputs(src, other, tmp_path / "c", "s")
    for kind in ("seg", "sr"):
        da, db, dc = (dcmread(x[kind]) for x in (a, b, c))
        assert (da.SOPInstanceUID, da.SeriesInstanceUID) == (db.SOPInstanceUID, db.SeriesInstanceUID)
        assert da.SOPInstanceUID != dc.SOPInstanceUID and da.SeriesInstanceUID != dc.SeriesInstanceUID
    assert dcmread(a["seg"]).SOPInstanceUID != dcmread(a["sr"]).SOPInstanceUID
    assert derived_uid(src.SOPInstanceUID, "loris-test-1.2", "seg", "0") == dcmread(a["seg"]).SOPInstanceUID


def test_not_distended_empty_mask_and_no_box(tmp_path: Path) -> None:
    src = _source("us8")
    pred = Prediction(np.zeros((ROWS, COLS), bool), 0.1, 0.5, None, "loris-test", "1.2")
    when = dt.datetime(2025, 1, 2, 3, 4, 5)
    paths = write_dicom_outputs(src, pred, tmp_path, "s", when=when)
    seg = hd.seg.segread(paths["seg"])
    assert not seg.pixel_array.any() and seg.ContentDate == "20250102"
    sr = dcmread(paths["sr"])
    verdicts = [i for i in _named(sr, "41699000") if i.ValueType == "CODE"]
    assert [v.ConceptCodeSequence[0].CodeValue for v in verdicts] == ["272519000"]  # Absent
    assert not [i for i in _items(sr) if i.ValueType == "SCOORD"]


def test_refuses_what_cannot_be_referenced(tmp_path: Path) -> None:
    src = _source("us8")
    with pytest.raises(ValueError, match="mask shape"):
        write_dicom_outputs(src, Prediction(np.zeros((4, 4), bool), 0.1, 0.5, None, "m", "1"), tmp_path, "s")
    with pytest.raises(ValueError, match="frame"):
        write_dicom_outputs(src, _prediction(frame=1), tmp_path, "s")
    with pytest.raises(ValueError, match="sc"):
        write_dicom_outputs(src, _prediction(), tmp_path, "s", kinds=("sc",))
    del src.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        write_dicom_outputs(src, _prediction(), tmp_path, "s")
    assert not list(tmp_path.iterdir())
    assert "PatientID" in PATIENT_STUDY_KEPT


def test_source_without_patient_and_study_details(tmp_path: Path) -> None:
    """De-identified exports lack the Type 2 patient/study attributes: they come out empty, the source is unchanged."""
    src = _source("us8")
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID"):
        delattr(src, kw)
    del src.AccessionNumber, src.ReferringPhysicianName
    overlay = np.zeros((ROWS, COLS, 3), np.uint8)
    paths = write_dicom_outputs(src, _prediction(), tmp_path, "s", kinds=("seg", "sr", "sc"), overlay_bgr=overlay)
    for path in paths.values():
        obj = dcmread(path)
        assert obj.PatientName == "" and obj.PatientID == "" and obj.StudyInstanceUID == src.StudyInstanceUID
    assert "PatientName" not in src
    del src.Modality
    with pytest.raises(ValueError, match="Modality"):
        write_dicom_outputs(src, _prediction(), tmp_path / "m", "s")


def test_source_read_from_file_is_left_untouched(tmp_path: Path) -> None:
    src = _source("cine")
    path = tmp_path / "src.dcm"
    src.save_as(path, enforce_file_format=True)
    before = path.read_bytes()
    paths = write_dicom_outputs(path, _prediction(1), tmp_path / "out", "s", kinds=("seg",))
    assert path.read_bytes() == before and paths["seg"].is_file()
    assert dcmread(path).NumberOfFrames == 3


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
@pytest.mark.parametrize("kind", ["us8", "ct16", "cine"])
def test_dciodvfy_finds_no_errors(tmp_path: Path, kind: str) -> None:
    overlay = np.zeros((ROWS, COLS, 3), np.uint8)
    pred = _prediction(1 if kind == "cine" else 0)
    paths = write_dicom_outputs(_source(kind), pred, tmp_path, "s", kinds=("seg", "sr", "sc"), overlay_bgr=overlay)
    for path in paths.values():
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
