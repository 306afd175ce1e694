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


def _set_image(n: int, key: str, value: object):  # type: ignore[no-untyped-def]
    return lambda d: d["images"][n].__setitem__(key, value)


@pytest.mark.parametrize(
    "edit,expected",
    [
        (_set_image(2, "file_name", None), "annotations.json images[2]: file_name None is not a non-empty string"),
        (_set_image(3, "id", [3, 4]), "img003.png: image id [3, 4] is not an integer"),
        (_set_image(4, "width", "abc"), "img004.png: width 'abc' is not a positive integer"),
        (_set_image(4, "height", float("nan")), "img004.png: height nan is not a positive integer"),
        (_set_image(5, "distended", "false"), "img005.png: distended 'false' is not a JSON boolean"),
        (_set_image(5, "patient_id", None), "img005.png: patient_id None is not a non-empty string"),
        (_set_image(6, "file_name", "../../outside/x.png"), "resolves to"),
        (_set_image(6, "file_name", "/etc/passwd"), "/etc/passwd: file_name '/etc/passwd' is absolute"),
        (lambda d: d["annotations"][7].__setitem__("bbox", [1, float("nan"), 5, 5]), "img007.png: box [1.0, nan"),
        (lambda d: d["annotations"][7].__setitem__("bbox", ["1", 2, 3, 4]), "img007.png: annotation 7 has no valid"),
        (lambda d: d["annotations"][8].__setitem__("image_id", [8]), "annotations[8] image_id [8] is not an integer"),
        (lambda d: d["annotations"][8].__setitem__("category_id", [1]), "category_id [1] is not an integer"),
        (lambda d: d["categories"].__setitem__(0, {"id": [1], "name": "recess"}), "no category named 'recess'"),
    ],
)
def test_malformed_entries_are_named_problems_not_tracebacks(
    tmp_path: Path, edit, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    make_dataset(tmp_path)
    _edit(tmp_path, edit)
    messages = [str(p) for p in check_dataset(tmp_path)]
    assert any(expected in m for m in messages), messages
    assert main(["check", str(tmp_path)]) == 1
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("content", ["[]", "null", "3", '"x"', '{"images": {}}'])
def test_annotations_that_are_not_an_object(tmp_path: Path, content: str) -> None:
    (tmp_path / "annotations.json").write_text(content)
    problems = check_dataset(tmp_path)
    assert len(problems) == 1 and problems[0].file.endswith("annotations.json")
    assert "object" in problems[0].reason or "images" in problems[0].reason


def test_symlink_outside_the_folder_and_loops(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_dataset(root)
    (tmp_path / "outside.png").write_bytes((root / "images" / "img001.png").read_bytes())
    (root / "images" / "img001.png").unlink()
    (root / "images" / "img001.png").symlink_to(tmp_path / "outside.png")
    (root / "images" / "img002.png").unlink()
    (root / "images" / "loop.png").symlink_to(root / "images" / "img002.png")
    (root / "images" / "img002.png").symlink_to(root / "images" / "loop.png")
    messages = [str(p) for p in check_dataset(root)]
    assert any("img001.png" in m and "outside the dataset folder" in m for m in messages), messages
    assert any("img002.png" in m for m in messages), messages


def test_valid_splits_json_passes(tmp_path: Path) -> None:
    make_dataset(tmp_path)  # patients p0..p7 with 3 images each, ids 0..23
    (tmp_path / "splits.json").write_text(json.dumps([{"train": [0, 1, 2], "val": [3, 4, 5], "test": [6, 7, 8]}]))
    assert check_dataset(tmp_path) == []


def test_splits_json_problems(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    (tmp_path / "splits.json").write_text(json.dumps([{"train": [0, 1, 3], "val": [2], "test": [99]}]))
    messages = [str(p) for p in check_dataset(tmp_path)]
    assert any("splits.json: fold 0 test: unknown image ids [99]" in m for m in messages), messages
    assert any("patients ['p0'] are in both train and val" in m for m in messages), messages
    (tmp_path / "splits.json").write_text('{"train": [[1]]}')
    assert any("not a valid splits file" in str(p) for p in check_dataset(tmp_path))


BAD_VALUES: list[object] = [None, [], {}, [1], "abc", "", -1, 0, 1.5, float("nan"), float("inf"), True, "../x"]


def test_no_mutation_of_one_entry_makes_check_raise(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=2, per_patient=2)
    good = json.loads((tmp_path / "annotations.json").read_text())
    for section in ("images", "annotations", "categories"):
        for key in list(good[section][0]) + ["extra"]:
            for value in BAD_VALUES:
                doc = json.loads(json.dumps(good))
                doc[section][0][key] = value
                (tmp_path / "annotations.json").write_text(json.dumps(doc))
                check_dataset(tmp_path, read_images=False)  # must not raise
        for value in BAD_VALUES:
            doc = json.loads(json.dumps(good))
            doc[section] = value
            (tmp_path / "annotations.json").write_text(json.dumps(doc))
            check_dataset(tmp_path, read_images=False)
