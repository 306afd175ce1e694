"""DICOM reading: display pipeline, ultrasound regions, compressed syntaxes, frames, PHI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from scans.readers import (
    ReadError,
    box_from_crop,
    count_frames,
    find_bmode_box,
    frame_indices,
    mask_from_crop,
    read_image,
    read_scan,
)
from tests.helpers import build_dicom

PYDICOM_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"


def build(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **kw: Any) -> Any:
    """An uncompressed ultrasound DICOM with ``pixels`` and PHI (patient name and ID) for the PHI checks."""
    return build_dicom(
        path, pixels, photometric, **{"PatientName": "Doe^Jane", "PatientID": "PHI-12345", "Modality": "US", **kw}
    )


def test_windowed_12bit_spans_the_displayed_range(tmp_path: Path) -> None:
    from pydicom.pixels import apply_windowing

    ramp = np.linspace(0, 4095, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    ds = build(tmp_path / "w.dcm", ramp, bits_stored=12, WindowCenter=1600, WindowWidth=1600)
    out = read_image(tmp_path / "w.dcm")
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, apply_windowing(ramp.astype(float), ds) / 4095, atol=1e-6)
    build(tmp_path / "raw.dcm", ramp, bits_stored=12)  # no window: stored range 0..4095
    np.testing.assert_allclose(read_image(tmp_path / "raw.dcm"), ramp / 4095, atol=1e-6)


def test_voi_lut_sequence_scales_by_its_output_bits(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = list(range(255, -1, -1))  # an inverting LUT
    item["LUTData"].VR = "US"
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    build(tmp_path / "lut.dcm", img, VOILUTSequence=[item])
    np.testing.assert_allclose(read_image(tmp_path / "lut.dcm"), (255 - img) / 255, atol=1e-6)


def test_signed_with_rescale_uses_the_stored_range_not_the_image_minimum(tmp_path: Path) -> None:
    a = np.full((8, 8), -1000, np.int16)
    a[0, 0] = 1000
    b = a.copy()
    b[1, 1] = -3000  # a darker pixel elsewhere must not shift the others
    kw = {"signed": True, "RescaleSlope": 1, "RescaleIntercept": -1024}
    build(tmp_path / "a.dcm", a, **kw)
    build(tmp_path / "b.dcm", b, **kw)
    ra, rb = read_image(tmp_path / "a.dcm"), read_image(tmp_path / "b.dcm")
    assert ra[0, 0] == pytest.approx((1000 + 32768) / 65535, abs=1e-6)
    assert ra[3, 3] == rb[3, 3] == pytest.approx((-1000 + 32768) / 65535, abs=1e-6)
    # a window in rescaled units: center 0, width 4096, so stored -1000 (rescaled -2024) sits near 0
    build(tmp_path / "c.dcm", a, WindowCenter=0, WindowWidth=4096, **kw)
    rc = read_image(tmp_path / "c.dcm")
    assert rc[3, 3] == pytest.approx(0.5 + (-2024 - 0) / 4095, abs=2e-3)
    assert rc[0, 0] == pytest.approx(0.5 + (1000 - 1024) / 4095, abs=2e-3)


def test_monochrome1_is_inverted_after_the_window(tmp_path: Path) -> None:
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    build(tmp_path / "m1.dcm", img, photometric="MONOCHROME1")
    np.testing.assert_allclose(read_image(tmp_path / "m1.dcm"), 1 - img / 255, atol=1e-6)
    build(tmp_path / "m1w.dcm", img, photometric="MONOCHROME1", WindowCenter=128, WindowWidth=64)
    out = read_image(tmp_path / "m1w.dcm")
    assert out[0, 0] == 1.0 and out[15, 15] == 0.0  # dark stored values show white


def test_palette_colour_goes_through_the_lut(tmp_path: Path) -> None:
    idx = np.arange(256, dtype=np.uint8).reshape(16, 16)
    red = (np.arange(256) * 257).astype(np.uint16)
    zeros = np.zeros(256, np.uint16)
    build(
        tmp_path / "pal.dcm",
        idx,
        photometric="PALETTE COLOR",
        RedPaletteColorLookupTableDescriptor=[256, 0, 16],
        GreenPaletteColorLookupTableDescriptor=[256, 0, 16],
        BluePaletteColorLookupTableDescriptor=[256, 0, 16],
        RedPaletteColorLookupTableData=red.tobytes(),
        GreenPaletteColorLookupTableData=zeros.tobytes(),
        BluePaletteColorLookupTableData=zeros.tobytes(),
    )
    np.testing.assert_allclose(read_image(tmp_path / "pal.dcm"), 0.299 * idx / 255, atol=2e-3)


def test_ybr_full_and_jpeg_baseline_ybr_422(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.pixels import convert_color_space
    from pydicom.uid import JPEGBaseline8Bit

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    build(tmp_path / "ybr.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), photometric="YBR_FULL")
    assert read_image(tmp_path / "ybr.dcm").mean() == pytest.approx(0.299 * 200 / 255, abs=0.01)
    ok, jpg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])  # YCbCr 4:2:0 stream
    assert ok
    ds = build(tmp_path / "j.dcm", rgb, photometric="YBR_FULL_422", save=False)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpg.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "j.dcm", enforce_file_format=True)
    assert read_image(tmp_path / "j.dcm").mean() == pytest.approx(0.299 * 200 / 255, abs=0.02)


def _ultrasound_region(box: tuple[int, int, int, int], spatial: int, data_type: int) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = spatial, data_type, 0
    item.RegionLocationMinX0, item.RegionLocationMinY0, item.RegionLocationMaxX1, item.RegionLocationMaxY1 = box
    return item


def test_ultrasound_regions_crop_to_the_largest_tissue_region(tmp_path: Path) -> None:
    img = np.zeros((120, 160), np.uint8)
    img[20:100, 40:140] = 150  # B-mode
    img[105:118, 0:160] = 90  # a spectral strip, larger than the tissue region once padded
    regions = [
        _ultrasound_region((0, 0, 159, 119), 3, 3),  # spectral Doppler over the whole frame
        _ultrasound_region((40, 20, 139, 99), 1, 1),  # 2-D tissue
        _ultrasound_region((50, 30, 59, 39), 1, 1),  # a smaller 2-D tissue region
    ]
    build(tmp_path / "us.dcm", img, SequenceOfUltrasoundRegions=regions)
    res = read_scan(tmp_path / "us.dcm")
    assert res.crop == (40, 20, 140, 100) and res.crop_source == "region 1"
    assert res.image.shape == (80, 100) and res.original_size == (160, 120) and res.cropped
    assert np.all(res.image == pytest.approx(150 / 255))
    # boxes and masks found in the crop map back onto the original pixels
    assert box_from_crop((5.0, 6.0, 15.0, 16.0), res.crop) == (45.0, 26.0, 55.0, 36.0)
    m = np.zeros(res.image.shape, bool)
    m[0, 0] = True
    assert np.argwhere(res.mask_to_original(m)).tolist() == [[20, 40]]
    assert mask_from_crop(m, res.crop, res.original_size).shape == (120, 160)
    # the user's choice, no crop, and the unchanged read_image
    assert read_scan(tmp_path / "us.dcm", region=2).crop == (50, 30, 60, 40)
    assert read_scan(tmp_path / "us.dcm", crop="none").crop == (0, 0, 160, 120)
    assert read_image(tmp_path / "us.dcm").shape == (120, 160)
    with pytest.raises(ReadError, match="us.dcm.*region 7"):
        read_scan(tmp_path / "us.dcm", region=7)


def test_auto_crop_finds_the_bmode_region_without_regions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = np.zeros((200, 300), np.uint8)
    img[40:180, 60:240] = rng.integers(30, 255, (140, 180))  # speckle
    img[90:120, 100:160] = 3  # an anechoic pocket inside
    img[5:15, 5:80] = 255  # header text
    img[50:170, 280:290] = np.linspace(0, 255, 120)[:, None].astype(np.uint8)  # grey bar
    build(tmp_path / "s.dcm", img)
    cv2.imwrite(str(tmp_path / "s.png"), img)
    for name in ("s.dcm", "s.png"):
        res = read_scan(tmp_path / name, crop="auto")
        assert res.crop_source == "auto"
        assert np.abs(np.array(res.crop) - (60, 40, 240, 180)).max() <= 2, res.crop
    assert read_scan(tmp_path / "s.dcm").crop == (0, 0, 300, 200)  # regions mode: no regions, no crop
    assert find_bmode_box(np.zeros((50, 50), np.float32)) is None


def _mr_small() -> np.ndarray:
    path = PYDICOM_FILES / "MR_small.dcm"
    if not path.is_file():
        pytest.skip("pydicom's bundled test files are not installed")
    return read_image(path)


def _need_decoder(path: Path) -> None:
    """Skip, naming the package, when the environment lacks the decoder (pyproject lists them)."""
    import pydicom
    from pydicom.pixels import get_decoder

    if not path.is_file():
        pytest.skip("pydicom's bundled test files are not installed")
    tsyntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if not get_decoder(tsyntax).is_available:
        pytest.skip(f"no decoder for {tsyntax.name}: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"],
)
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(name: str) -> None:
    expected = _mr_small()
    _need_decoder(PYDICOM_FILES / name)
    np.testing.assert_array_equal(read_image(PYDICOM_FILES / name), expected)


def test_jpeg_lossless_process14_equals_rle() -> None:
    lossless, rle = PYDICOM_FILES / "SC_rgb_jpeg_gdcm.dcm", PYDICOM_FILES / "SC_rgb_rle.dcm"
    _need_decoder(lossless)
    np.testing.assert_array_equal(read_image(lossless), read_image(rle))


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_with_pydicom_encoders_and_multiframe(tmp_path: Path, syntax: str) -> None:
    import pydicom.uid
    from pydicom.pixels import get_encoder

    uid = getattr(pydicom.uid, syntax)
    if not get_encoder(uid).is_available:
        pytest.skip(f"no {syntax} encoder installed")
    frames = np.stack([np.full((64, 80), v, np.uint16) * 257 for v in (10, 100, 250)])
    frames[:, 5:9, 5:9] = 1234
    ds = build(tmp_path / "c.dcm", frames, save=False)
    ds.compress(uid)
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    assert count_frames(tmp_path / "c.dcm") == 3
    res = read_scan(tmp_path / "c.dcm", frame=1)
    assert res.frame_count == 3 and res.frame == 1
    np.testing.assert_allclose(res.image, frames[1] / 65535, atol=1e-6)


def test_missing_decoder_names_file_syntax_and_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import RLELossless

    ds = build(tmp_path / "r.dcm", np.arange(64, dtype=np.uint8).reshape(8, 8), save=False)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "r.dcm", enforce_file_format=True)
    monkeypatch.setattr(get_decoder(RLELossless), "_available", {})  # as if no plugin were installed
    with pytest.raises(ReadError) as info:
        read_image(tmp_path / "r.dcm")
    msg = str(info.value)
    assert "r.dcm" in msg and "RLE Lossless" in msg and "1.2.840.10008.1.2.5" in msg and "pylibjpeg-rle" in msg


def test_frames_first_all_and_n(tmp_path: Path) -> None:
    frames = np.stack([np.full((6, 6), v, np.uint8) for v in (10, 100, 250)])
    build(tmp_path / "cine.dcm", frames)
    assert count_frames(tmp_path / "cine.dcm") == 3
    assert frame_indices(tmp_path / "cine.dcm", "first") == [0]
    assert frame_indices(tmp_path / "cine.dcm", "all") == [0, 1, 2]
    assert frame_indices(tmp_path / "cine.dcm", 2) == [2]
    assert frame_indices(tmp_path / "cine.dcm", "1") == [1]
    assert read_scan(tmp_path / "cine.dcm", frame=2).image.mean() == pytest.approx(250 / 255)
    with pytest.raises(ReadError, match="cine.dcm.*frame 3.*3 frame"):
        frame_indices(tmp_path / "cine.dcm", 3)
    with pytest.raises(ValueError, match="frames must be"):
        frame_indices(tmp_path / "cine.dcm", "last")
    cv2.imwrite(str(tmp_path / "a.png"), frames[0])
    assert count_frames(tmp_path / "a.png") == 1 and frame_indices(tmp_path / "a.png", "all") == [0]


def test_no_pixel_data_is_a_clear_error(tmp_path: Path) -> None:
    ds = build(tmp_path / "np.dcm", np.zeros((4, 4), np.uint8), save=False)
    del ds.PixelData
    ds.save_as(tmp_path / "np.dcm", enforce_file_format=True)
    with pytest.raises(ReadError, match="np.dcm: DICOM file has no pixel data"):
        read_scan(tmp_path / "np.dcm")


def test_only_the_sop_instance_uid_leaves_the_reader(tmp_path: Path) -> None:
    ds = build(tmp_path / "phi.dcm", np.full((4, 4), 7, np.uint8))
    res = read_scan(tmp_path / "phi.dcm")
    assert res.sop_instance_uid == ds.SOPInstanceUID
    text = repr({k: v for k, v in vars(res).items() if k != "image"})
    assert "Doe" not in text and "PHI-12345" not in text
    assert read_scan(tmp_path / "phi.dcm").frame_count == 1


# Real scanner ultrasound files that ship with pydicom (anonymised GE, Philips and SonoSite exports):
# name -> (frames, whether it carries a Sequence of Ultrasound Regions)
SCANNER_FILES = {
    "examples_palette.dcm": (1, True),  # Philips, PALETTE COLOR
    "examples_ybr_color.dcm": (30, True),  # SonoSite cine, JPEG baseline YBR_FULL_422
    "examples_rgb_color.dcm": (1, False),  # GE, RGB
    "examples_jpeg2k.dcm": (1, False),  # GE, JPEG 2000 lossless YBR_RCT
    "ExplVR_BigEnd.dcm": (1, False),  # GE, RGB, explicit VR big endian
}


@pytest.mark.parametrize("name", sorted(SCANNER_FILES))
def test_real_scanner_ultrasound_files(name: str) -> None:
    """Each real scanner file reads as grey in [0, 1] with real contrast, cropped to its B-mode region when
    it has one (the panels around it dropped), every frame of the cine readable."""
    path = PYDICOM_FILES / name
    _need_decoder(path)
    frames, has_regions = SCANNER_FILES[name]
    full = read_scan(path, crop="none")
    got = read_scan(path, frame=frames - 1)
    assert got.frame_count == frames and full.frame_count == frames
    for r in (full, got):
        assert r.image.dtype == np.float32 and 0.0 <= r.image.min() and r.image.max() <= 1.0
        assert r.image.std() > 0.02, "no contrast: the display pipeline was not applied"
    w, h = full.original_size
    assert full.image.shape == (h, w) and full.crop == (0, 0, w, h)
    if has_regions:
        x0, y0, x1, y1 = got.crop
        assert got.crop_source.startswith("region ") and (x1 - x0) * (y1 - y0) < w * h
        assert got.image.shape == (y1 - y0, x1 - x0)
    else:
        assert got.crop_source == "none" and got.crop == (0, 0, w, h)
