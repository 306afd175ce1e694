"""DICOM pixels as a viewer displays them, ultrasound regions, frames and decoders.

Grey levels follow the DICOM display pipeline with pydicom's own functions: the Modality LUT
(or rescale slope/intercept), then the VOI LUT or window (first view), then a scale to [0, 1] by
the output range of that last step, so a 12-bit file windowed at 1600/1600 spans [0, 1] as it is
displayed. Without a VOI the range is the stored bit range after the Modality LUT, so unsigned
files without rescale read as ``value / (2**BitsStored - 1)``. MONOCHROME1 is inverted, PALETTE
COLOR goes through ``apply_color_lut``, YBR is converted to RGB, and colour becomes BT.601 luma.

Ultrasound regions (Sequence of Ultrasound Regions, PS3.3 C.8.5.5): a region with Region Spatial
Format 1 (2-D) and Region Data Type 1 (tissue) is a B-mode image; the largest one is the default
crop, and any region can be picked by its index in the sequence. Region corners are inclusive
pixel indices; :class:`Region` boxes are half-open ``(x0, y0, x1, y1)``.

Compressed transfer syntaxes decode through pydicom's decoders and the plugin packages they use
(pylibjpeg with -libjpeg, -openjpeg and -rle, or Pillow); a missing one is a :class:`ReadError`
naming the file, the transfer syntax and the package to install.

Nothing patient-identifying leaves this module: a :class:`DicomFrame` carries pixels, regions, the
frame count and the SOP Instance UID (a row key), no other tag.

>>> import numpy as np, tempfile, pathlib
>>> from pydicom.dataset import Dataset
>>> ds = Dataset()
>>> ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation = 12, 0, "MONOCHROME2"
>>> ds.WindowCenter, ds.WindowWidth = 1600, 1600
>>> g = display_gray(ds, np.array([[0, 800, 1600, 2400, 4095]], np.uint16), "x.dcm")
>>> [round(float(v), 3) for v in g[0]]
[0.0, 0.0, 0.5, 1.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scans.image import ReadError, to_unit_gray

SPATIAL_2D = 1  # Region Spatial Format 0001H: 2D (tissue or flow)
DATA_TISSUE = 1  # Region Data Type 0001H: tissue

# pip packages that give pydicom a decoder, by transfer syntax UID prefix (pydicom names the rest).
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


@dataclass(frozen=True)
class Region:
    """One item of the Sequence of Ultrasound Regions; ``box`` is half-open ``(x0, y0, x1, y1)``."""

    index: int
    box: tuple[int, int, int, int]
    spatial_format: int
    data_type: int

    @property
    def area(self) -> int:
        return max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0)

    @property
    def is_tissue_2d(self) -> bool:
        return self.spatial_format == SPATIAL_2D and self.data_type == DATA_TISSUE


@dataclass(frozen=True)
class DicomFrame:
    """One decoded frame: grey image in [0, 1] (uncropped), its regions and identifiers."""

    image: np.ndarray
    frame: int
    frame_count: int
    sop_instance_uid: str | None
    regions: tuple[Region, ...]


def open_dicom(path: Path | str, pixels: bool = True) -> Any:
    """``pydicom.dcmread`` with every failure turned into a :class:`ReadError`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise ReadError(path, f"not a readable DICOM file ({exc.__class__.__name__}: {exc})") from exc


def _int(ds: Any, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword, default)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return default


def count_frames(ds: Any) -> int:
    """Number of frames of a dataset (1 when Number of Frames is absent or empty)."""
    return max(_int(ds, "NumberOfFrames", 1), 1)


def ultrasound_regions(ds: Any) -> tuple[Region, ...]:
    """Regions of the Sequence of Ultrasound Regions, clipped to the image; empty tuple when absent."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    out = []
    for i, item in enumerate(ds.get("SequenceOfUltrasoundRegions") or []):
        x0, y0 = _int(item, "RegionLocationMinX0", -1), _int(item, "RegionLocationMinY0", -1)
        x1, y1 = _int(item, "RegionLocationMaxX1", -1), _int(item, "RegionLocationMaxY1", -1)
        if min(x0, y0, x1, y1) < 0:
            continue  # a region without a location cannot be cropped to
        box = (max(x0, 0), max(y0, 0), min(x1 + 1, cols or x1 + 1), min(y1 + 1, rows or y1 + 1))
        out.append(Region(i, box, _int(item, "RegionSpatialFormat", 0), _int(item, "RegionDataType", 0)))
    return tuple(out)


def choose_region(regions: tuple[Region, ...], path: Path | str, region: int | None = None) -> Region | None:
    """The region to crop to: ``region`` (an index into the sequence) when given, else the largest
    2-D tissue region, else the largest 2-D region of any data type (e.g. colour flow), else None.

    >>> r = (Region(0, (0, 0, 10, 10), 1, 1), Region(1, (0, 0, 50, 50), 1, 2), Region(2, (0, 0, 20, 20), 1, 1))
    >>> choose_region(r, "x.dcm").index, choose_region(r, "x.dcm", region=1).index
    (2, 1)
    """
    if region is not None:
        for r in regions:
            if r.index == region:
                if r.area == 0:
                    raise ReadError(path, f"ultrasound region {region} is empty inside the image")
                return r
        raise ReadError(path, f"ultrasound region {region} requested but the file has {len(regions)} usable region(s)")
    for pick in (lambda r: r.is_tissue_2d, lambda r: r.spatial_format == SPATIAL_2D):
        candidates = [r for r in regions if pick(r) and r.area > 0]
        if candidates:
            return max(candidates, key=lambda r: (r.area, -r.index))
    return None


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = _int(ds, "BitsStored", 8)
    if _int(ds, "PixelRepresentation", 0) == 0:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _modality_range(ds: Any) -> tuple[float, float]:
    """Output range of the Modality LUT stage, as pydicom's ``apply_windowing`` computes it."""
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    lo, hi = _stored_range(ds)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        lo, hi = min(a, b), max(a, b)
    return lo, hi


def _voi_kind(ds: Any) -> str:
    """Which VOI step ``apply_voi_lut`` applies: "lut", "window" or "none"."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return "none"


def display_gray(ds: Any, arr: np.ndarray, path: Path | str) -> np.ndarray:
    """A decoded monochrome frame through Modality LUT and VOI LUT/window, scaled to [0, 1].

    The scale is the output range of the last stage applied (see the module docstring).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(arr, ds)
        if _voi_kind(ds) == "lut":
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        else:  # a window maps onto the Modality LUT's output range, as pydicom's apply_windowing does
            lo, hi = _modality_range(ds)
        values = apply_voi_lut(values, ds, index=0)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise ReadError(path, f"invalid Modality/VOI LUT attributes ({exc.__class__.__name__}: {exc})") from exc
    out = (np.asarray(values, dtype=np.float64) - lo) / max(hi - lo, 1e-12)
    gray = np.clip(out, 0.0, 1.0).astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        gray = 1.0 - gray  # MONOCHROME1 shows the minimum as white
    return np.ascontiguousarray(gray, dtype=np.float32)


def check_decoder(ds: Any, path: Path | str) -> None:
    """Raise a :class:`ReadError` naming the transfer syntax and the package to install when
    pydicom has no working decoder for the pixel data of ``ds``."""
    from pydicom.pixels import get_decoder

    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or not tsyntax.is_compressed:
        return
    name = f"{tsyntax.name} ({tsyntax})"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise ReadError(path, f"transfer syntax {name} has no pydicom decoder") from exc
    if not decoder.is_available:
        hint = _DECODER_PACKAGES.get(str(tsyntax))
        missing = "; ".join(decoder.missing_dependencies)
        install = f"pip install {hint}" if hint else f"install one of: {missing}"
        raise ReadError(path, f"no decoder installed for transfer syntax {name}: {install}")


def read_dicom_frame(path: Path | str, frame: int = 0) -> DicomFrame:
    """Decode frame ``frame`` of a DICOM file to grey [0, 1] with its regions (see the module docstring).

    Raises:
        ReadError: naming the file and the reason (unreadable, no pixel data, frame out of range,
            no decoder for the transfer syntax, corrupt pixel data).
    """
    from pydicom.pixels import apply_color_lut, pixel_array

    ds = open_dicom(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ReadError(path, "DICOM file has no pixel data")
    n_frames = count_frames(ds)
    if not 0 <= frame < n_frames:
        raise ReadError(path, f"frame {frame} requested but the file has {n_frames} frame(s)")
    check_decoder(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        # as_rgb converts YBR_* to RGB; index decodes only the requested frame.
        arr = np.asarray(pixel_array(ds, index=frame if n_frames > 1 else None, as_rgb=True))
    except Exception as exc:  # decoders raise many types on corrupt or unsupported data
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        what = getattr(tsyntax, "name", tsyntax)
        raise ReadError(path, f"cannot decode DICOM pixel data ({what}; {exc.__class__.__name__}: {exc})") from exc
    if photometric == "PALETTE COLOR":
        try:
            rgb = np.asarray(apply_color_lut(arr, ds))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ReadError(path, f"invalid palette colour lookup table ({exc})") from exc
        gray = to_unit_gray(rgb, path, 65535.0 if rgb.dtype == np.uint16 else 255.0, rgb_order="RGB")
    elif arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        gray = to_unit_gray(arr, path, _stored_range(ds)[1], rgb_order="RGB")
    else:
        if arr.ndim != 2:
            raise ReadError(path, f"unsupported pixel array shape {arr.shape}")
        gray = display_gray(ds, arr, path)
    uid = ds.get("SOPInstanceUID")
    return DicomFrame(
        image=gray,
        frame=frame,
        frame_count=n_frames,
        sop_instance_uid=str(uid) if uid else None,
        regions=ultrasound_regions(ds),
    )


def dicom_frame_count(path: Path | str) -> int:
    """Number of frames, read from the header without decoding pixels."""
    return count_frames(open_dicom(path, pixels=False))
