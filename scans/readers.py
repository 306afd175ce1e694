"""Image readers for every format LoRIS accepts, and resizing that carries boxes and masks.

Every reader returns a 2-D float32 grayscale array in [0, 1]. Integer images are divided by
the maximum of their bit depth (255 for 8 bit, 65535 for 16 bit, ``2**BitsStored - 1`` for
DICOM), so intensities stay comparable across files of one bit depth. Colour images are
converted to luma (ITU-R BT.601, as OpenCV does).

Resizing (:func:`resize_image`, :func:`resize_mask`) is anisotropic to a square ``size x size`` grid, as the
authors do: images use area interpolation when shrinking and bilinear when enlarging,
masks use nearest neighbour, and :mod:`scans.dataset` scales boxes by ``(size / width, size / height)``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
SUPPORTED_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES


class ReadError(ValueError):
    """An image could not be read; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the ``DICM`` magic at byte 128 for suffix-less files."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix == "":
        try:
            with open(path, "rb") as fh:
                head = fh.read(132)
            return len(head) == 132 and head[128:132] == b"DICM"
        except OSError:
            return False
    return False


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES or is_dicom(path)


def _to_unit_gray(arr: np.ndarray, path: Path, max_value: float | None = None, rgb_order: str = "BGR") -> np.ndarray:
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[..., 0]
        elif arr.shape[2] in (3, 4):
            code = {
                ("BGR", 3): cv2.COLOR_BGR2GRAY,
                ("BGR", 4): cv2.COLOR_BGRA2GRAY,
                ("RGB", 3): cv2.COLOR_RGB2GRAY,
                ("RGB", 4): cv2.COLOR_RGBA2GRAY,
            }[(rgb_order, arr.shape[2])]
            if arr.dtype not in (np.uint8, np.uint16, np.float32):
                arr = arr.astype(np.float32)
            arr = cv2.cvtColor(arr, code)
        else:
            raise ReadError(path, f"unsupported channel count {arr.shape[2]}")
    if arr.ndim != 2:
        raise ReadError(path, f"unsupported image shape {arr.shape}")
    if arr.size == 0:
        raise ReadError(path, "empty image")
    if max_value is None:
        if arr.dtype == np.uint8:
            max_value = 255.0
        elif arr.dtype == np.uint16:
            max_value = 65535.0
        elif np.issubdtype(arr.dtype, np.integer):
            max_value = float(np.iinfo(arr.dtype).max)
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if 0.0 <= lo and hi <= 1.0:
                return np.ascontiguousarray(arr, dtype=np.float32)
            out = (arr.astype(np.float32) - lo) / max(hi - lo, 1e-12)
            return np.ascontiguousarray(out, dtype=np.float32)
    out = arr.astype(np.float32) / np.float32(max_value)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def read_raster(path: Path) -> np.ndarray:
    """PNG, JPEG, BMP or TIFF, 8 or 16 bit, gray or colour."""
    data = np.fromfile(path, dtype=np.uint8)  # imdecode avoids cv2.imread's silent None on odd paths
    if data.size == 0:
        raise ReadError(path, "file is empty")
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ReadError(path, "not a decodable PNG/JPEG/BMP/TIFF image (corrupt or wrong format)")
    return _to_unit_gray(arr, path)


def read_dicom(path: Path, frame: int = 0) -> np.ndarray:
    """A DICOM image: single or multi-frame; MONOCHROME1/2, RGB, PALETTE COLOR or YBR."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as exc:
        raise ReadError(path, f"not a readable DICOM file ({exc.__class__.__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise ReadError(path, "DICOM file has no pixel data")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if not 0 <= frame < n_frames:
        raise ReadError(path, f"frame {frame} requested but the file has {n_frames} frame(s)")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        from pydicom.pixels import pixel_array  # pydicom >= 3

        # as_rgb converts YBR_* to RGB; index picks a frame without decoding the others.
        arr = pixel_array(ds, index=frame if n_frames > 1 else None, as_rgb=True)
    except Exception as exc:  # pydicom raises many types for unsupported transfer syntaxes
        raise ReadError(path, f"cannot decode DICOM pixel data ({exc.__class__.__name__}: {exc})") from exc
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        max_value = 65535.0 if arr.dtype == np.uint16 else 255.0
        return _to_unit_gray(np.asarray(arr), path, max_value, rgb_order="RGB")
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.signedinteger):
        arr = arr.astype(np.float32) - float(arr.min())
    max_value = float(2**bits - 1)
    gray = _to_unit_gray(arr, path, max_value, rgb_order="RGB")
    if photometric == "MONOCHROME1":  # MONOCHROME1 encodes black as the maximum
        gray = 1.0 - gray
    return gray


def read_image(path: Path | str, frame: int = 0) -> np.ndarray:
    """Read any supported image as float32 grayscale in [0, 1].

    Raises:
        ReadError: naming the file and the reason, for missing, unsupported or corrupt files.
    """
    path = Path(path)
    if not path.is_file():
        raise ReadError(path, "file not found")
    if is_dicom(path):
        return read_dicom(path, frame)
    if path.suffix.lower() not in RASTER_SUFFIXES:
        raise ReadError(path, f"unsupported file type '{path.suffix or '(none)'}'")
    return read_raster(path)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image.astype(np.float32, copy=False)
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image.astype(np.float32, copy=False), (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to ``size x size`` or to ``(width, height)``."""
    w, h = (size, size) if isinstance(size, int) else size
    if mask.shape == (h, w):
        return mask.astype(bool, copy=False)
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
