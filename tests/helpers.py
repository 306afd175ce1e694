"""Builders for small datasets and DICOM files used by several test modules."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from scans.coco import encode_mask, save_coco
from scans.records import Scan


def write_dicom(path: Path, frames: np.ndarray, photometric: str = "MONOCHROME2") -> None:
    """Write an uncompressed DICOM with pydicom: ``frames`` is [H,W], [F,H,W] or [H,W,3] / [F,H,W,3]."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "test"
    color = frames.shape[-1] == 3 and frames.ndim >= 3 and photometric != "MONOCHROME2"
    multi = frames.ndim == (4 if color else 3)
    ds.Rows, ds.Columns = frames.shape[-3:-1] if color else frames.shape[-2:]
    if multi:
        ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = 16 if frames.dtype == np.uint16 else 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_dataset(root: Path, n_patients: int = 8, per_patient: int = 3, size: int = 64, seed: int = 0) -> list[Scan]:
    """A small valid dataset folder: dark band (recess) in a noisy bright image, one box each."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    scans = []
    i = 0
    for p in range(n_patients):
        for _ in range(per_patient):
            label = int(i % 4 == 0)
            img = (rng.random((size, size)) * 80 + 120).astype(np.uint8)
            y0 = size // 2 - 4
            thick = 10 if label else 2
            img[y0 : y0 + thick, size // 4 : 3 * size // 4] = 10
            mask = np.zeros((size, size), bool)
            mask[y0 : y0 + thick, size // 4 : 3 * size // 4] = True
            path = root / "images" / f"img{i:03d}.png"
            cv2.imwrite(str(path), img)
            box = (size / 4 - 2, y0 - 3.0, 3 * size / 4 + 2, y0 + thick + 3.0)
            scans.append(Scan(i, path, f"p{p}", label, box, size, size, encode_mask(mask) if label else None))
            i += 1
    save_coco(root / "annotations.json", scans, root)
    return scans
