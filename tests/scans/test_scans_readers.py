from pathlib import Path

import cv2
import numpy as np
import pytest

from scans.readers import ReadError, read_image, resize_image, resize_mask
from tests.helpers import write_dicom


def test_png_16bit_keeps_full_range(tmp_path: Path) -> None:
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), arr)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, arr / 65535.0, atol=1e-6)


def test_rgb_jpeg_becomes_gray(tmp_path: Path) -> None:
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 2] = 200  # red in BGR order
    cv2.imwrite(str(tmp_path / "a.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (16, 16)
    # BT.601 luma of pure red is 0.299 * value
    assert abs(float(out.mean()) - 0.299 * 200 / 255) < 0.02


def test_bmp_and_tiff(tmp_path: Path) -> None:
    img = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    for name in ("a.bmp", "a.tif"):
        cv2.imwrite(str(tmp_path / name), img)
        np.testing.assert_allclose(read_image(tmp_path / name), img / 255.0, atol=1e-6)


def test_dicom_single_and_multiframe(tmp_path: Path) -> None:
    frame = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)
    write_dicom(tmp_path / "one.dcm", frame)
    np.testing.assert_allclose(read_image(tmp_path / "one.dcm"), frame / 65535.0, atol=1e-6)
    frames = np.stack([np.full((10, 10), v, np.uint8) for v in (10, 100, 250)])
    write_dicom(tmp_path / "multi.dcm", frames)
    assert read_image(tmp_path / "multi.dcm").mean() == pytest.approx(10 / 255)
    assert read_image(tmp_path / "multi.dcm", frame=2).mean() == pytest.approx(250 / 255)
    with pytest.raises(ReadError, match="multi.dcm.*frame 5"):
        read_image(tmp_path / "multi.dcm", frame=5)


def test_dicom_rgb_and_monochrome1(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    assert read_image(tmp_path / "rgb.dcm").mean() == pytest.approx(0.587, abs=0.01)
    mono1 = np.full((8, 8), 255, np.uint8)
    write_dicom(tmp_path / "m1.dcm", mono1, photometric="MONOCHROME1")
    assert read_image(tmp_path / "m1.dcm").max() == pytest.approx(0.0)


def test_dicom_without_suffix_is_detected(tmp_path: Path) -> None:
    write_dicom(tmp_path / "noext", np.full((4, 4), 51, np.uint8))
    assert read_image(tmp_path / "noext").mean() == pytest.approx(0.2)


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("bad.png", b"not a png at all", "not a decodable"),
        ("empty.png", b"", "empty"),
        ("bad.dcm", b"\x00" * 200, "DICOM"),
        ("notes.txt", b"hello", "unsupported file type"),
    ],
)
def test_unreadable_files_name_file_and_reason(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ReadError) as info:
        read_image(tmp_path / name)
    assert name in str(info.value) and reason in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="gone.png: file not found"):
        read_image(tmp_path / "gone.png")


def test_resize_image_and_mask_to_the_model_grid() -> None:
    img = np.zeros((100, 200), np.float32)
    mask = np.zeros((100, 200), bool)
    mask[40:60, 50:150] = True
    out, m = resize_image(img, 64), resize_mask(mask, 64)
    assert out.shape == (64, 64) and m.shape == (64, 64) and m.dtype == bool
    ys, xs = np.nonzero(m)
    assert xs.min() >= 15 and xs.max() <= 48 and ys.min() >= 25 and ys.max() <= 39
    back = resize_mask(m, (200, 100))  # (width, height), as predict maps masks back to a scan
    assert back.shape == (100, 200) and abs(int(back.sum()) - int(mask.sum())) < 0.15 * mask.sum()


def test_dicom_ybr_full_is_converted_to_rgb_then_gray(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL")
    # BT.601 luma of red 200 is 0.299 * 200; YBR rounding costs about one grey level
    assert read_image(tmp_path / "ybr.dcm").mean() == pytest.approx(0.299 * 200 / 255, abs=0.01)
