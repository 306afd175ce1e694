"""DICOM results a PACS can store (``predict --dicom-out``): a Segmentation, a Structured Report and an overlay.

For one source DICOM and one prediction, written with highdicom (docs/design.md, "Outputs for clinicians and PACS"):

- ``seg``: a binary Segmentation (SEG) with one segment, "Joint effusion/distension", coded SCT
  49755003 "Morphologically abnormal structure" (category) / SCT 41699000 "Effusion" (type), anatomic
  region SCT 49076000 "Knee joint"; its frame references the source instance (and frame).
- ``sr``: a Comprehensive SR (TID 1500 measurement report) holding the image score, the threshold,
  the verdict (SCT 41699000 "Effusion" = SCT 52101004 "Present" or SCT 272519000 "Absent") and the
  box as a closed POLYLINE SCOORD on the source image (and frame).
- ``sc``: a Secondary Capture of the overlay (RGB), referencing the source.

Each object's Series and SOP Instance UIDs are derived from the source's UIDs and the model id
(:func:`derived_uid`), so a rerun writes objects with the same UIDs, and files are written atomically.

PHI: to be filed beside its source in a PACS, a derived object must repeat the source's patient and
study identity (highdicom copies every root attribute of the Patient, Clinical Trial Subject, General
Study, Patient Study and Clinical Trial Study modules). LoRIS keeps only :data:`PATIENT_STUDY_KEPT`
(the Type 1 and 2 attributes that file the object under the right patient and study) and deletes
the rest of those modules (age, weight, comments, other ids, study description, physicians, ...).
This is why these objects are opt-in (``--dicom-out``): the CSV and PNG outputs never hold patient
identifiers, these do.

>>> derived_uid("1.2.3.4", "loris-1", "seg") == derived_uid("1.2.3.4", "loris-1", "seg")
True
>>> derived_uid("1.2.3.4", "loris-1", "seg") != derived_uid("1.2.3.4", "loris-2", "seg")
True
"""

from __future__ import annotations

import copy
import datetime as _dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from runtime.io import atomic_write

KINDS: tuple[str, ...] = ("seg", "sr", "sc")
MANUFACTURER = "LoRIS"
SEGMENT_LABEL = "Joint effusion/distension"
SEGMENT_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003
SEGMENT_TYPE = codes.SCT.Effusion  # SCT 41699000
ANATOMY = codes.SCT.KneeJoint  # SCT 49076000
# The image score is LoRIS's own quantity (a mean anomaly-map value), so it has a private code.
SCORE_CODE = Code("LORIS-SCORE", "99LORIS", "LoRIS image anomaly score")
THRESHOLD_CODE = codes.DCM.ThresholdValue  # DCM 122411
UNITY = Code("1", "UCUM", "no units")
PROCEDURE = codes.SCT.DiagnosticUltrasonography  # SCT 16310003

# Patient/study attributes kept in derived objects: those that file them with their source.
PATIENT_STUDY_KEPT: frozenset[str] = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    }
)
_PATIENT_STUDY_MODULES = ("patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study")
# The single-frame SOP class highdicom is shown for a multi-frame source without a Frame of Reference.
_SINGLE_FRAME_CLASS = {str(UltrasoundMultiFrameImageStorage): UltrasoundImageStorage}
# Series numbers of the derived series (any fixed value; PACS viewers sort series by it).
_SERIES_NUMBER = {"seg": 9001, "sr": 9002, "sc": 9003}


@dataclass(frozen=True)
class Prediction:
    """One scan's result in the source's own pixels (``predict``'s CSV row plus its mask).

    ``mask``: bool ``[Rows, Columns]``; ``box``: ``(x1, y1, x2, y2)`` in source pixels, or None;
    ``frame``: the 0-based source frame the prediction is for (multi-frame sources).
    """

    mask: np.ndarray
    score: float
    threshold: float
    box: tuple[float, float, float, float] | None
    model_name: str
    model_version: str
    frame: int = 0
    box_source: str = ""

    @property
    def distended(self) -> bool:
        return self.score >= self.threshold

    @property
    def verdict(self) -> str:
        return "distended" if self.distended else "not distended"

    @property
    def model_id(self) -> str:
        return f"{self.model_name}-{self.model_version}"


def derived_uid(source_uid: str, model_id: str, *parts: str) -> str:
    """A UID for a derived object, a pure function of the source UID, the model id and ``parts``.

    A name-based (SHA-1) UUID in the ``2.25`` form (PS3.5 B.2), so no organisation root is needed.

    >>> derived_uid("1.2.3", "m").startswith("2.25.")
    True
    """
    name = "\x1f".join([str(source_uid), str(model_id), *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _n_frames(ds: Dataset) -> int:
    return int(getattr(ds, "NumberOfFrames", 1) or 1)


def _check_source(ds: Dataset, pred: Prediction) -> None:
    missing = [
        k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality") if k not in ds
    ]
    if missing:
        raise ValueError(f"source DICOM lacks {missing}: a derived object cannot reference it")
    if tuple(pred.mask.shape) != (int(ds.Rows), int(ds.Columns)):
        raise ValueError(f"mask shape {pred.mask.shape} is not the source's (Rows, Columns) {(ds.Rows, ds.Columns)}")
    if not 0 <= pred.frame < _n_frames(ds):
        raise ValueError(f"frame {pred.frame} is outside the source's {_n_frames(ds)} frame(s)")


def _prune_patient_study(obj: Dataset) -> None:
    """Delete the patient/study module attributes highdicom copied that :data:`PATIENT_STUDY_KEPT` lacks."""
    from highdicom._standard_utils import get_module_attribute_map

    amap = get_module_attribute_map()
    for module in _PATIENT_STUDY_MODULES:
        for item in amap[module]:
            kw = str(item["keyword"])
            if not item["path"] and kw not in PATIENT_STUDY_KEPT and kw in obj:
                delattr(obj, kw)


def _stamp(obj: Dataset, when: _dt.datetime | None) -> None:
    """Fix the content and creation times (None keeps highdicom's: now)."""
    if when is None:
        return
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    for prefix in ("Content", "Series", "InstanceCreation"):
        if f"{prefix}Date" in obj:
            setattr(obj, f"{prefix}Date", date)
            setattr(obj, f"{prefix}Time", time)


def _uids(ds: Dataset, pred: Prediction, kind: str) -> dict[str, Any]:
    return {
        "series_instance_uid": derived_uid(ds.SeriesInstanceUID, pred.model_id, kind, "series"),
        "series_number": _SERIES_NUMBER[kind],
        "sop_instance_uid": derived_uid(ds.SOPInstanceUID, pred.model_id, kind, str(pred.frame)),
        "instance_number": pred.frame + 1,
    }


def _algorithm(pred: Prediction) -> Any:
    import highdicom as hd

    return hd.AlgorithmIdentificationSequence(
        name=pred.model_name, family=codes.cid7162.ArtificialIntelligence, version=pred.model_version
    )


def build_seg(source: Dataset, pred: Prediction, when: _dt.datetime | None = None) -> Dataset:
    """A binary SEG of ``pred.mask`` (one segment) referencing ``source`` (and its frame)."""
    import highdicom as hd

    _check_source(source, pred)
    # highdicom segments only single-frame sources without a Frame of Reference (ultrasound cine has
    # none): it is given a single-frame view of the source, and the references are set right after.
    view = source
    single = _n_frames(source) > 1 and "FrameOfReferenceUID" not in source
    if single:
        view = _header_copy(source)
        view.SOPClassUID = _SINGLE_FRAME_CLASS.get(str(source.SOPClassUID), UltrasoundImageStorage)
        del view.NumberOfFrames
    n = _n_frames(view)
    mask = np.zeros((n, *pred.mask.shape), np.uint8)
    mask[0 if single else pred.frame] = pred.mask.astype(bool)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=SEGMENT_CATEGORY,
        segmented_property_type=SEGMENT_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(pred),
        anatomic_regions=[ANATOMY],
    )
    seg = hd.seg.Segmentation(
        source_images=[view],
        pixel_array=mask if n > 1 else mask[0],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        manufacturer=MANUFACTURER,
        manufacturer_model_name=pred.model_name,
        software_versions=pred.model_version,
        device_serial_number=pred.model_version,
        # an empty mask still gets its frame: "nothing segmented" is a result too
        omit_empty_frames=False,
        content_description=f"LoRIS {pred.verdict}, score {pred.score:.6g} (threshold {pred.threshold:.6g})",
        **_uids(source, pred, "seg"),
    )
    if single:
        _retarget(seg, source, pred.frame)
    if "FrameOfReferenceUID" not in seg:
        seg.PatientOrientation = source.get("PatientOrientation", "")  # Type 2C without a frame of reference
    _prune_patient_study(seg)
    _stamp(seg, when)
    return seg


def _header_copy(ds: Dataset) -> Dataset:
    """A deep copy of ``ds`` without its pixel data (the source is never modified)."""
    out = Dataset()
    for elem in ds:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            out.add(copy.deepcopy(elem))
    return out


def _retarget(obj: Dataset, source: Dataset, frame: int) -> None:
    """Point every reference to ``source`` at its real SOP class, and source-image references at ``frame``."""
    for elem in obj.iterall():
        if elem.VR != "SQ":
            continue
        for i, item in enumerate(elem.value):
            if item.get("ReferencedSOPInstanceUID") == source.SOPInstanceUID:
                item.ReferencedSOPClassUID = source.SOPClassUID
                if elem.keyword == "SourceImageSequence":
                    # a copy: highdicom shares reference items between sequences that take no frame number
                    item = elem.value[i] = copy.deepcopy(item)
                    item.ReferencedFrameNumber = frame + 1


def _box_polyline(box: tuple[float, float, float, float]) -> np.ndarray:
    """A closed polyline (5 points, column/row) around a box given as pixel edges."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], np.float32)


def _sr_group(source: Dataset, pred: Prediction) -> Any:
    """The SR's one measurement group: score, threshold and verdict, on the box (TID 1410) when there
    is one, else on the whole source image (TID 1501)."""
    import highdicom as hd

    frames = [pred.frame + 1] if _n_frames(source) > 1 else None
    algo = hd.sr.AlgorithmIdentification(name=pred.model_name, version=pred.model_version)
    common: dict[str, Any] = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(source.SOPInstanceUID, pred.model_id, "sr-roi", str(pred.frame)),
            identifier=f"recess box ({pred.box_source or 'detector'})",
        ),
        finding_type=SEGMENT_TYPE,
        finding_sites=[hd.sr.FindingSite(ANATOMY)],
        algorithm_id=algo,
        measurements=[
            hd.sr.Measurement(name=SCORE_CODE, value=float(pred.score), unit=UNITY, algorithm_id=algo),
            hd.sr.Measurement(name=THRESHOLD_CODE, value=float(pred.threshold), unit=UNITY, algorithm_id=algo),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=SEGMENT_TYPE, value=codes.SCT.Present if pred.distended else codes.SCT.Absent
            )
        ],
    )
    if pred.box is not None and np.all(np.isfinite(pred.box)):
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_box_polyline(pred.box),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source, referenced_frame_numbers=frames),
        )
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)
    ref = hd.sr.SourceImageForMeasurementGroup.from_source_image(source, referenced_frame_numbers=frames)
    return hd.sr.MeasurementsAndQualitativeEvaluations(source_images=[ref], **common)


def build_sr(source: Dataset, pred: Prediction, when: _dt.datetime | None = None) -> Dataset:
    """A Comprehensive SR (TID 1500) with the score, threshold, verdict and box on ``source``."""
    import highdicom as hd

    _check_source(source, pred)
    group = _sr_group(source, pred)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", pred.model_id), name=pred.model_name, manufacturer_name=MANUFACTURER
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=PROCEDURE,
        imaging_measurements=[group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report,
        manufacturer=MANUFACTURER,
        is_complete=True,
        **_uids(source, pred, "sr"),
    )
    _prune_patient_study(sr)
    _stamp(sr, when)
    return sr


def build_overlay_sc(
    source: Dataset, pred: Prediction, overlay_bgr: np.ndarray, when: _dt.datetime | None = None
) -> Dataset:
    """A Secondary Capture of the overlay image (``[Rows, Columns, 3]`` BGR uint8, as ``predict`` writes it)."""
    import highdicom as hd

    _check_source(source, pred)
    if overlay_bgr.shape != (*pred.mask.shape, 3) or overlay_bgr.dtype != np.uint8:
        raise ValueError(f"overlay must be uint8 {(*pred.mask.shape, 3)}, got {overlay_bgr.dtype} {overlay_bgr.shape}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(overlay_bgr[..., ::-1]),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        # highdicom insists on an orientation; the source's (often empty: unknown) replaces it below
        patient_orientation=("A", "F"),
        manufacturer=MANUFACTURER,
        **_uids(source, pred, "sc"),
    )
    sc.PatientOrientation = source.get("PatientOrientation", "")
    sc.Laterality = source.get("Laterality", "")  # Type 2C in the General Series module
    sc.SeriesDescription = f"LoRIS overlay ({pred.model_name} {pred.model_version})"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    _reference_source(sc, source, pred)
    _prune_patient_study(sc)
    _stamp(sc, when)
    return sc


def _reference_source(obj: Dataset, source: Dataset, pred: Prediction) -> None:
    """Source Image Sequence naming the scan (and frame) a Secondary Capture was derived from."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if _n_frames(source) > 1:
        item.ReferencedFrameNumber = pred.frame + 1
    obj.SourceImageSequence = [item]


# Type 2 patient/study attributes highdicom copies from the source: de-identified or scanner-export
# files often lack them, and an empty value is what the standard allows when they are unknown.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _with_empty_type2(ds: Dataset) -> Dataset:
    """``ds``, or a header copy of it with the missing :data:`_TYPE2_COPIED` attributes present and empty."""
    missing = [k for k in _TYPE2_COPIED if k not in ds]
    if not missing:
        return ds
    out = _header_copy(ds)
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    for k in missing:
        setattr(out, k, "")
    return out


def save_atomic(obj: Dataset, path: Path) -> Path:
    """Write ``obj`` as a DICOM file (with file meta), via a temporary file and a rename."""
    atomic_write(path, lambda tmp: obj.save_as(tmp, enforce_file_format=True))
    return Path(path)


def write_dicom_outputs(
    source: Dataset | Path,
    pred: Prediction,
    out_dir: Path,
    stem: str,
    kinds: Sequence[str] = ("seg", "sr"),
    overlay_bgr: np.ndarray | None = None,
    when: _dt.datetime | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/<stem>.<kind>.dcm`` for each of ``kinds`` (``seg``, ``sr``, ``sc``); returns the paths.

    ``source`` is the source dataset or its path (read without pixel data). ``sc`` needs ``overlay_bgr``.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown DICOM output kinds {unknown}; choose from {list(KINDS)}")
    ds = source if isinstance(source, Dataset) else dcmread(source, stop_before_pixels=True)
    ds = _with_empty_type2(ds)
    out: dict[str, Path] = {}
    for kind in kinds:
        if kind == "seg":
            obj = build_seg(ds, pred, when)
        elif kind == "sr":
            obj = build_sr(ds, pred, when)
        else:
            if overlay_bgr is None:
                raise ValueError("the 'sc' output needs the overlay image")
            obj = build_overlay_sc(ds, pred, overlay_bgr, when)
        out[kind] = save_atomic(obj, Path(out_dir) / f"{stem}.{kind}.dcm")
    return out
