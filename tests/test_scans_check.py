import json
from pathlib import Path

import pytest

from scans.__main__ import main
from scans.check import check_dataset
from tests.helpers import make_dataset


def _edit(root: Path, fn) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads((root / "annotations.json").read_text())
    fn(doc)
    (root / "annotations.json").write_text(json.dumps(doc))


def test_good_folder_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dataset(tmp_path)
    assert check_dataset(tmp_path) == []
    assert main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OK, 24 images (6 distended, 18 normal) from 8 patients" in out


def _missing_image(root: Path) -> str:
    (root / "images" / "img003.png").unlink()
    return "img003.png: file not found"


def _corrupt_image(root: Path) -> str:
    (root / "images" / "img004.png").write_bytes(b"garbage")
    return "img004.png: not a decodable"


def _bad_json(root: Path) -> str:
    (root / "annotations.json").write_text("[1, 2")
    return "annotations.json: invalid JSON"


def _missing_key(root: Path) -> str:
    _edit(root, lambda d: d["images"][2].pop("patient_id"))
    return "img002.png: image entry missing key(s) patient_id"


def _duplicate_id(root: Path) -> str:
    _edit(root, lambda d: d["images"][5].__setitem__("id", d["images"][6]["id"]))
    return "img005.png: duplicate image id 6"


def _box_outside(root: Path) -> str:
    _edit(root, lambda d: d["annotations"][7].__setitem__("bbox", [50, 50, 40, 10]))
    return "img007.png: box [50.0, 50.0, 40.0, 10.0] lies outside the 64x64 image"


def _mask_outside(root: Path) -> str:
    _edit(root, lambda d: d["annotations"][0].__setitem__("bbox", [16, 26, 10, 6]))
    return "img000.png: segmentation has"


def _no_box(root: Path) -> str:
    _edit(root, lambda d: d["annotations"].pop(9))
    return "img009.png: image has no recess box"


@pytest.mark.parametrize(
    "fault",
    [_missing_image, _corrupt_image, _bad_json, _missing_key, _duplicate_id, _box_outside, _mask_outside, _no_box],
)
def test_each_fault_is_reported_with_its_file(tmp_path: Path, fault, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    make_dataset(tmp_path)
    expected = fault(tmp_path)
    messages = [str(p) for p in check_dataset(tmp_path)]
    assert any(expected in m for m in messages), messages
    assert main(["check", str(tmp_path)]) == 1
    assert expected in capsys.readouterr().err
