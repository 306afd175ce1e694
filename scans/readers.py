"""Image readers for every format LoRIS accepts, and resizing that carries boxes and masks.

Every reader returns a 2-D float32 grayscale array in [0, 1]. Integer raster images are divided
by the maximum of their bit depth (255 for 8 bit, 65535 for 16 bit), so intensities stay
comparable across files of one bit depth. DICOM goes through the display pipeline (Modality LUT,
VOI LUT or window, MONOCHROME1 inversion; see :mod:`scans.dicom`). Colour images are converted to
luma (ITU-R BT.601, as OpenCV does). Each page of a multi-page TIFF is a frame, as each frame of a
cine DICOM is. A JPEG is turned as its EXIF Orientation says, as viewers and annotation tools show
it (:func:`apply_orientation`; :attr:`ReadResult.orientation` records it).

Two entry points:

- :func:`read_image` ``(path, frame=0) -> ndarray``: the whole frame, never cropped.
- :func:`read_scan` ``(path, frame=0, crop="regions", region=None) -> ReadResult``: the frame
  cropped to its B-mode region, with the crop ``(x0, y0, x1, y1)`` (half-open, original pixels),
  the original ``(width, height)``, the frame count and, for DICOM, the SOP Instance UID.
  ``crop="regions"`` crops to the DICOM Sequence of Ultrasound Regions when present (the largest
  2-D tissue region, or ``region``, an index into the sequence); ``"auto"`` does the same and,
  when a file has no regions (or is not DICOM), finds the B-mode region from the pixels with
  :func:`find_bmode_box`; ``"none"`` never crops. Map results back to the original pixels with
  :func:`box_from_crop` and :func:`mask_from_crop`, annotations into the crop with
  :func:`box_to_crop`. Cine files: :func:`count_frames` and :func:`frame_indices` list the frames
  for ``frames="first"|"all"|N``.

Resizing (:func:`resize_image`, :func:`resize_mask`) is anisotropic to a square ``size x size`` grid, as the
authors do: images use area interpolation when shrinking and bilinear when enlarging,
masks use nearest neighbour, and :mod:`scans.dataset` scales boxes by ``(size / width, size / height)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from scans.image import ReadError, to_unit_gray

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
TIFF_SUFFIXES = {".tif", ".tiff"}  # may hold several pages: each page is a frame
JPEG_SUFFIXES = {".jpg", ".jpeg"}  # may carry an EXIF orientation: applied on read
DICOM_SUFFIXES = {".dcm", ".dicom"}
SUPPORTED_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES

Crop = tuple[int, int, int, int]
CropMode = Literal["regions", "auto", "none"]
CROP_MODES = ("regions", "auto", "none")


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


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 of a TIFF-structured block (an EXIF payload); 1 when absent."""
    order: Literal["little", "big"]
    if tiff[:2] == b"II":
        order = "little"
    elif tiff[:2] == b"MM":
        order = "big"
    else:
        return 1

    def num(at: int, size: int) -> int:
        return int.from_bytes(tiff[at : at + size], order)

    if len(tiff) < 8 or num(2, 2) != 42:
        return 1
    ifd = num(4, 4)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(num(ifd, 2)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if num(entry, 2) == 0x0112:
            kind = num(entry + 2, 2)  # SHORT (3), as EXIF says; LONG (4) from some writers
            value = num(entry + 8, 2) if kind == 3 else num(entry + 8, 4) if kind == 4 else 1
            return value if 1 <= value <= 8 else 1
    return 1


def jpeg_orientation(data: bytes) -> int:
    """The EXIF Orientation (1 to 8) of JPEG bytes: 1 (as stored) when there is none or it is unreadable.

    >>> jpeg_orientation(bytes.fromhex("ffd8ffd9"))
    1
    """
    if data[:2] != b"\xff\xd8":
        return 1
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return 1
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after this
            return 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return 1
        segment = data[i + 4 : i + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            return _tiff_orientation(segment[6:])
        i += 2 + length
    return 1


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels ``arr`` (``[h, w]`` or ``[h, w, c]``) as displayed under EXIF ``orientation``
    (1: as stored; 2: mirrored; 3: rotated 180; 4: flipped; 5: transposed; 6: rotated 90 clockwise;
    7: transversed; 8: rotated 90 counter-clockwise), as OpenCV's colour decode and viewers show them.

    >>> apply_orientation(np.array([[1, 2], [3, 4]]), 6).tolist()
    [[3, 1], [4, 2]]
    """
    if orientation == 2:
        arr = arr[:, ::-1]
    elif orientation == 3:
        arr = arr[::-1, ::-1]
    elif orientation == 4:
        arr = arr[::-1]
    elif orientation == 5:
        arr = np.swapaxes(arr, 0, 1)
    elif orientation == 6:
        arr = np.rot90(arr, k=-1)
    elif orientation == 7:
        arr = np.rot90(arr, k=-1)[::-1]
    elif orientation == 8:
        arr = np.rot90(arr, k=1)
    return np.ascontiguousarray(arr)


def tiff_page_count(path: Path) -> int:
    """Pages of a TIFF (each a frame), counted by OpenCV from its directory chain without decoding pixels.

    Raises:
        ReadError: when OpenCV cannot read the file.
    """
    n = int(cv2.imcount(str(path), cv2.IMREAD_UNCHANGED))
    if n < 1:
        raise ReadError(path, "not a decodable TIFF image (corrupt or wrong format)")
    return n


def _decode_page(data: np.ndarray, page: int) -> np.ndarray | None:
    """Page ``page`` of the TIFF bytes ``data`` (decoding that page alone where OpenCV can)."""
    try:
        ok, mats = cv2.imdecodemulti(data, cv2.IMREAD_UNCHANGED, None, (page, page + 1))
    except (cv2.error, TypeError):  # an OpenCV without page ranges: decode them all
        ok, mats = cv2.imdecodemulti(data, cv2.IMREAD_UNCHANGED)
        mats = mats[page : page + 1] if ok else mats
    return mats[0] if ok and len(mats) >= 1 else None


def decode_raster(path: Path, frame: int = 0) -> tuple[np.ndarray, int]:
    """``(grey [0, 1] image, EXIF orientation applied)`` of a PNG, JPEG, BMP or TIFF (page ``frame``):
    JPEGs are turned as their EXIF Orientation says (1: as stored)."""
    data = np.fromfile(path, dtype=np.uint8)  # imdecode avoids cv2.imread's silent None on odd paths
    if data.size == 0:
        raise ReadError(path, "file is empty")
    if frame and path.suffix.lower() in TIFF_SUFFIXES:
        arr = _decode_page(data, frame)
    else:
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)  # UNCHANGED keeps 16 bit, and ignores EXIF
    if arr is None:
        raise ReadError(path, "not a decodable PNG/JPEG/BMP/TIFF image (corrupt or wrong format)")
    orientation = jpeg_orientation(data.tobytes()) if path.suffix.lower() in JPEG_SUFFIXES else 1
    return to_unit_gray(apply_orientation(arr, orientation), path), orientation


def read_raster(path: Path, frame: int = 0) -> np.ndarray:
    """PNG, JPEG, BMP or TIFF, 8 or 16 bit, gray or colour; page ``frame`` of a multi-page TIFF; a JPEG
    turned by its EXIF orientation."""
    return decode_raster(path, frame)[0]


def _raster_frame(path: Path, frame: int, strict: bool) -> tuple[int, int]:
    """``(page to read, page count)`` for ``frame`` of a raster file: multi-page TIFFs have one frame per
    page; other files one. A frame past the end of a multi-page file is a :class:`ReadError`; for a
    single-image file too when ``strict``, else that image is read (``read_image``'s rule, as before)."""
    n = tiff_page_count(path) if frame and path.suffix.lower() in TIFF_SUFFIXES else 1
    if 0 <= frame < n:
        return frame, n
    if n > 1 or strict or frame < 0:
        raise ReadError(path, f"frame {frame} requested but the file has {n} frame(s)")
    return 0, n


def read_dicom(path: Path, frame: int = 0) -> np.ndarray:
    """A DICOM frame as displayed, uncropped (see :mod:`scans.dicom` for the grey-level rules)."""
    from scans.dicom import read_dicom_frame

    return read_dicom_frame(path, frame).image


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
    return read_raster(path, _raster_frame(path, frame, strict=False)[0])


@dataclass(frozen=True)
class ReadResult:
    """One frame read by :func:`read_scan`.

    Attributes:
        image: float32 ``[h, w]`` grey in [0, 1], already cropped.
        crop: ``(x0, y0, x1, y1)`` half-open, in original pixels; the whole frame when not cropped.
        original_size: ``(width, height)`` of the frame before cropping.
        frame: the frame read; frame_count: frames in the file (1 for raster images).
        sop_instance_uid: DICOM SOP Instance UID (a row key), None for raster images.
        crop_source: ``"none"``, ``"region N"`` (index in the Sequence of Ultrasound Regions) or ``"auto"``.
        orientation: the EXIF Orientation applied to a JPEG's stored pixels (1: none; see
            :func:`apply_orientation`); ``crop`` and ``original_size`` are in the turned image's pixels.
    """

    image: np.ndarray
    crop: Crop
    original_size: tuple[int, int]
    frame: int
    frame_count: int
    sop_instance_uid: str | None
    crop_source: str
    orientation: int = 1

    @property
    def cropped(self) -> bool:
        return self.crop != (0, 0, *self.original_size)

    def box_to_original(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return box_from_crop(box, self.crop)

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        return mask_from_crop(mask, self.crop, self.original_size)


def box_from_crop(box: tuple[float, float, float, float], crop: Crop) -> tuple[float, float, float, float]:
    """A ``(x1, y1, x2, y2)`` box in crop pixels -> original pixels.

    >>> box_from_crop((1.0, 2.0, 5.0, 6.0), (10, 20, 60, 80))
    (11.0, 22.0, 15.0, 26.0)
    """
    x0, y0 = crop[0], crop[1]
    return (float(box[0]) + x0, float(box[1]) + y0, float(box[2]) + x0, float(box[3]) + y0)


def box_to_crop(box: tuple[float, float, float, float], crop: Crop) -> tuple[float, float, float, float]:
    """A box in original pixels -> crop pixels (not clipped: a box leaving the crop stays visible as such).

    >>> box_to_crop((11.0, 22.0, 15.0, 26.0), (10, 20, 60, 80))
    (1.0, 2.0, 5.0, 6.0)
    """
    x0, y0 = crop[0], crop[1]
    return (float(box[0]) - x0, float(box[1]) - y0, float(box[2]) - x0, float(box[3]) - y0)


def mask_from_crop(mask: np.ndarray, crop: Crop, original_size: tuple[int, int]) -> np.ndarray:
    """A mask over the crop pasted into an all-False mask of the original ``(width, height)``.

    >>> mask_from_crop(np.ones((2, 3), bool), (1, 1, 4, 3), (5, 4)).astype(int).sum(axis=0).tolist()
    [0, 2, 2, 2, 0]
    """
    x0, y0, x1, y1 = crop
    if mask.shape[:2] != (y1 - y0, x1 - x0):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the crop is {x1 - x0}x{y1 - y0}")
    out = np.zeros((original_size[1], original_size[0]) + mask.shape[2:], dtype=mask.dtype)
    out[y0:y1, x0:x1] = mask
    return out


def mask_to_crop(mask: np.ndarray, crop: Crop) -> np.ndarray:
    """The part of an original-size mask inside the crop."""
    x0, y0, x1, y1 = crop
    return mask[y0:y1, x0:x1]


def find_bmode_box(image: np.ndarray, threshold: float = 0.05, min_fraction: float = 0.05) -> Crop | None:
    """The B-mode region of a scanner screenshot, found from the pixels; None when nothing qualifies.

    Rule: pixels brighter than ``threshold`` are foreground; a closing then an opening with a square
    of side ~2% of the shorter image side bridges speckle and dark gaps and cuts thin lines (text,
    rulers, calipers); the bounding box of the largest 8-connected component is the B-mode region,
    kept only when that component covers at least ``min_fraction`` of the image.

    >>> img = np.zeros((100, 120), np.float32); img[20:80, 30:100] = 0.5; img[2:6, 2:40] = 1.0
    >>> find_bmode_box(img)
    (30, 20, 100, 80)
    """
    h, w = image.shape[:2]
    fg = (np.nan_to_num(image) > threshold).astype(np.uint8)
    k = max(3, int(round(min(h, w) / 50)) | 1)
    kernel = np.ones((k, k), np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, kernel)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel)
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[best, cv2.CC_STAT_AREA] < min_fraction * h * w:
        return None
    x, y, bw, bh = (
        int(stats[best, c]) for c in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT)
    )
    return (x, y, x + bw, y + bh)


def count_frames(path: Path | str) -> int:
    """Frames in a file: NumberOfFrames for DICOM (read from the header), the pages of a TIFF, 1 for
    other raster images."""
    path = Path(path)
    if not path.is_file():
        raise ReadError(path, "file not found")
    if is_dicom(path):
        from scans.dicom import dicom_frame_count

        return dicom_frame_count(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return tiff_page_count(path)
    return 1


def frame_indices(path: Path | str, frames: str | int = "first") -> list[int]:
    """The frames ``frames`` selects: ``"first"`` -> [0], ``"all"`` -> every frame, N -> [N].

    Raises:
        ReadError: for a frame past the end, naming the file and its frame count.
    """
    spec = str(frames).strip().lower()
    if spec == "first":
        return [0]
    n = count_frames(path)
    if spec == "all":
        return list(range(n))
    try:
        index = int(spec)
    except ValueError:
        raise ValueError(f"frames must be 'first', 'all' or a frame number, not {frames!r}") from None
    if not 0 <= index < n:
        raise ReadError(path, f"frame {index} requested but the file has {n} frame(s)")
    return [index]


def _dicom_frame(
    path: Path, frame: int, crop: CropMode, region: int | None
) -> tuple[np.ndarray, int, str | None, Crop | None, str]:
    """:func:`read_scan` of a DICOM file: its frame, frame count, SOP instance UID, and the chosen
    ultrasound region's box and name (``None, "none"`` without one, or with ``crop="none"``)."""
    from scans.dicom import choose_region, read_dicom_frame

    dcm = read_dicom_frame(path, frame)
    box: Crop | None = None
    source = "none"
    if crop != "none":
        chosen = choose_region(dcm.regions, path, region)
        if chosen is not None:
            box, source = chosen.box, f"region {chosen.index}"
    return dcm.image, dcm.frame_count, dcm.sop_instance_uid, box, source


def _raster_image(path: Path, frame: int, region: int | None) -> tuple[np.ndarray, int, int]:
    """:func:`read_scan` of a raster file: its frame, frame count and EXIF orientation."""
    if path.suffix.lower() not in RASTER_SUFFIXES:
        raise ReadError(path, f"unsupported file type '{path.suffix or '(none)'}'")
    page, n_frames = _raster_frame(path, frame, strict=True)
    if region is not None:
        raise ReadError(path, f"ultrasound region {region} requested but only DICOM files have regions")
    if n_frames == 1 and path.suffix.lower() in TIFF_SUFFIXES:
        n_frames = tiff_page_count(path)  # frame 0 of a TIFF: its page count is reported too
    image, orientation = decode_raster(path, page)
    return image, n_frames, orientation


def read_scan(path: Path | str, frame: int = 0, crop: CropMode = "regions", region: int | None = None) -> ReadResult:
    """Read one frame, cropped to its B-mode region by ``crop`` (see the module docstring).

    Raises:
        ReadError: naming the file and the reason; also when ``region`` is given and the file has
            no such ultrasound region.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, not {crop!r}")
    if crop == "none" and region is not None:
        raise ValueError("region is only used with crop='regions' or 'auto'")
    path = Path(path)
    if not path.is_file():
        raise ReadError(path, "file not found")
    box: Crop | None
    if is_dicom(path):
        image, n_frames, uid, box, source = _dicom_frame(path, frame, crop, region)
        orientation = 1
    else:
        image, n_frames, orientation = _raster_image(path, frame, region)
        uid, box, source = None, None, "none"
    h, w = image.shape
    if box is None and crop == "auto":
        box = find_bmode_box(image)
        if box == (0, 0, w, h):
            box = None  # the whole frame: nothing was cropped
        source = "auto" if box is not None else "none"
    if box is None:
        box = (0, 0, w, h)
    x0, y0, x1, y1 = box
    return ReadResult(
        image=np.ascontiguousarray(image[y0:y1, x0:x1]),
        crop=box,
        original_size=(w, h),
        frame=frame,
        frame_count=n_frames,
        sop_instance_uid=uid,
        crop_source=source,
        orientation=orientation,
    )


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
