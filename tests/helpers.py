"""Builders for small datasets and DICOM files used by several test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from evaluation import ImageRow
from scans.coco import encode_mask, save_coco
from scans.records import Scan, ScanArrays

# the tiny phantom (48 scans of 64 px in 3 folds) that the end-to-end tests run the quick profile on
TINY_PHANTOM = [
    "phantom.images=48",
    "phantom.distended=16",
    "phantom.patients=16",
    "phantom.size=64",
    "image_size=64",
    "folds=3",
]


def pinned_environment() -> tuple[str, str]:
    """What floating-point results depend on besides the code: torch's version and the CPU kernels it runs."""
    import torch

    return torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability()


def set_args(overrides: list[str]) -> list[str]:
    """Config overrides as CLI arguments: ``["a=1"]`` -> ``["--set", "a=1"]``."""
    return [a for s in overrides for a in ("--set", s)]


def random_scans(n: int, seed: int) -> ScanArrays:
    """``n`` random 32 px scans of ``n`` patients, all normal, each with a box near (8, 10, 24, 20)."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, 32, 32), dtype=np.float32)
    boxes = np.tile(np.array([8, 10, 24, 20], np.float32), (n, 1)) + rng.integers(-2, 3, (n, 4)).astype(np.float32)
    return ScanArrays(
        images,
        boxes,
        np.zeros((n, 32, 32), bool),
        np.zeros(n, np.int64),
        np.arange(n),
        [f"p{i}" for i in range(n)],
        np.ones((n, 2), np.float32),
    )


def fake_row(fold: int, i: int, prior: str, **values: Any) -> ImageRow:
    """Image ``i`` of ``fold`` scored with the ``prior`` boxes: two images a patient, odd images distended."""
    return ImageRow(id=100 * fold + i, patient=f"p{i // 2}", fold=fold, label=i % 2, prior_source=prior, **values)


def build_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    save: bool = True,
    sop_class: str | None = None,
    **attrs: Any,
) -> Any:
    """An uncompressed DICOM dataset with ``pixels`` ([H,W], [F,H,W], [H,W,3] or [F,H,W,3]), saved to ``path``.

    ``sop_class`` defaults to Ultrasound Multi-frame Image Storage; ``attrs`` are set last (any DICOM keyword).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class) if sop_class else UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    color = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    multi = pixels.ndim == (4 if color else 3)
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if color else pixels.shape[-2:]
    if multi:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if save:
        ds.save_as(path, enforce_file_format=True)
    return ds


def write_dicom(path: Path, frames: np.ndarray, photometric: str = "MONOCHROME2") -> None:
    """Write an uncompressed ultrasound DICOM (8 or 16 bit) with pydicom: ``frames`` as in :func:`build_dicom`."""
    from pydicom.uid import UltrasoundImageStorage

    build_dicom(path, frames, photometric, sop_class=UltrasoundImageStorage, PatientID="test")


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


def toy_box_scans(n: int, size: int, seed: int = 0) -> ScanArrays:
    """Noise images, each with one bright flat rectangle (a recess-like box) and its box."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, size, size)) * 0.3).astype(np.float32)
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        w, h = rng.integers(size // 3, size // 2), rng.integers(size // 10, size // 5)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        images[i, y : y + h, x : x + w] += 0.6
        boxes[i] = (x, y, x + w, y + h)
    return ScanArrays(
        images=images.clip(0, 1),
        boxes=boxes,
        masks=np.zeros((n, size, size), bool),
        labels=np.zeros(n, np.int64),
        ids=np.arange(n),
        patients=[f"p{i}" for i in range(n)],
        scale=np.ones((n, 2), np.float32),
    )


def quick_bundle_sets(cache: Path) -> list[str]:
    """``--set`` overrides of a bundle trained in seconds: a tiny phantom, YOLOv5u one epoch, no refiner."""
    return [
        "phantom.images=32",
        "phantom.distended=10",
        "phantom.patients=10",
        "phantom.size=64",
        "image_size=64",
        "unet.epochs=1",
        f"cache_dir={cache / 'models'}",
        "threads=2",
        "detector.refine=false",
        "detector.options={epochs: 1, imgsz: 64, batch: 8}",
    ]


def train_quick_bundle(tmp_path_factory: Any) -> tuple[Path, Path]:
    """A bundle trained with the quick profile on a tiny phantom (YOLOv5u without the refiner), and the
    cache folder holding that phantom's PNGs: ``(bundle_dir, cache)``."""
    import pytest

    from pipeline.__main__ import main

    cache = tmp_path_factory.mktemp("loris-cache")
    root = tmp_path_factory.mktemp("bundle")
    sets = quick_bundle_sets(cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORIS_CACHE", str(cache))
        args = ["train", "--detector", "yolov5", "--profile", "quick", "--out", str(root / "m"), "--no-progress"]
        assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    return root / "m", cache
