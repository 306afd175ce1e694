"""Property-based hardening of dataset validation (issue 18): any mutation of a valid ``annotations.json``
(types, nulls, NaN, duplicates, escaping paths, strings for booleans) gives named problems from
``scans check`` and a :class:`pipeline.data.DataError` (or a pass) from ``validate``, never a traceback."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipeline.data import DataError, validate  # noqa: E402
from scans.check import Problem, check_dataset  # noqa: E402
from scans.dataset import load_dataset  # noqa: E402
from tests.helpers import make_dataset  # noqa: E402

IMAGE_KEYS = ("id", "file_name", "width", "height", "patient_id", "distended")
ANN_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation")

# values that are wrong for most fields; "@outside" and "@absolute" become paths to a real image outside the dataset
HOSTILE = st.sampled_from(
    [
        None,
        math.nan,
        math.inf,
        -1,
        0,
        1e308,
        2.5,
        "abc",
        "",
        " ",
        "false",
        "true",
        "0",
        True,
        False,
        [],
        [1, 2],
        {},
        {"a": 1},
        [math.nan, 0, 1, 1],
        [0, 0, -5, 3],
        [-3, -3, 4, 4],
        [0, 0, 1e9, 1e9],
        "../x.png",
        "../../x.png",
        "images/../../x.png",
        "images/nope.png",
        "@outside",
        "@absolute",
    ]
)


@st.composite
def mutation(draw: st.DrawFn) -> tuple[str, Any]:
    """One edit of the annotations document: ``(kind, argument)``."""
    kind = draw(st.sampled_from(["image", "ann", "drop_image_key", "drop_ann_key", "dup_image", "dup_ann", "doc"]))
    if kind == "image":
        return kind, (draw(st.integers(0, 3)), draw(st.sampled_from(IMAGE_KEYS)), draw(HOSTILE))
    if kind == "ann":
        return kind, (draw(st.integers(0, 3)), draw(st.sampled_from(ANN_KEYS)), draw(HOSTILE))
    if kind == "drop_image_key":
        return kind, (draw(st.integers(0, 3)), draw(st.sampled_from(IMAGE_KEYS)))
    if kind == "drop_ann_key":
        return kind, (draw(st.integers(0, 3)), draw(st.sampled_from(ANN_KEYS)))
    if kind in ("dup_image", "dup_ann"):
        return kind, draw(st.integers(0, 3))
    return kind, draw(
        st.sampled_from([[], None, "x", 3, {}, {"images": None}, {"images": {}}, {"images": [], "annotations": 1}])
    )


def _resolve(value: Any, outside: Path) -> Any:
    if value == "@outside":
        return "../" + outside.name
    if value == "@absolute":
        return str(outside)
    return value


def _apply(doc: Any, edits: list[tuple[str, Any]], outside: Path) -> tuple[Any, bool]:
    """The mutated document, and whether a problem is certain (an edit the strict schema always refuses)."""
    certain = False
    for kind, arg in edits:
        if kind == "doc":
            return copy.deepcopy(arg), True  # a document of the wrong shape ends the edits
        if kind == "image":
            n, key, value = arg
            value = _resolve(value, outside)
            doc["images"][n][key] = value
            certain |= key == "file_name" and (not isinstance(value, str) or ".." in value or value.startswith("/"))
            certain |= key == "distended" and not isinstance(value, bool)
            certain |= key == "id" and (not isinstance(value, int) or isinstance(value, bool))
        elif kind == "ann":
            n, key, value = arg
            doc["annotations"][n][key] = _resolve(value, outside)
            certain |= key == "bbox"  # no value of HOSTILE is a valid box of its image
        elif kind == "drop_image_key":
            n, key = arg
            doc["images"][n].pop(key, None)
            certain = True
        elif kind == "drop_ann_key":
            n, key = arg
            doc["annotations"][n].pop(key, None)
            certain |= key in ("image_id", "category_id", "bbox")
        elif kind == "dup_image":
            doc["images"].append(copy.deepcopy(doc["images"][arg]))
            certain = True
        elif kind == "dup_ann":
            doc["annotations"].append(copy.deepcopy(doc["annotations"][arg]))
            certain = True
    return doc, certain


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any], Path]]:
    """A valid 4-image dataset, its annotations document and a readable image outside its folder."""
    base = tmp_path_factory.mktemp("prop")
    root = base / "ds"
    make_dataset(root, n_patients=2, per_patient=2, size=32)
    outside = base / "x.png"
    shutil.copy(root / "images" / "img001.png", outside)
    doc = json.loads((root / "annotations.json").read_text())
    assert check_dataset(root) == []
    yield root, doc, outside


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(mutation(), min_size=1, max_size=3))
def test_mutated_annotations_give_named_problems_never_a_traceback(
    dataset: tuple[Path, dict[str, Any], Path], edits: list[tuple[str, Any]]
) -> None:
    root, valid, outside = dataset
    doc, certain = _apply(copy.deepcopy(valid), edits, outside)
    (root / "annotations.json").write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them
    try:
        problems = check_dataset(root)
        assert isinstance(problems, list) and all(isinstance(p, Problem) and p.reason for p in problems)
        if certain:
            assert problems, f"{edits} passed the check"
        try:
            validate(root)
        except DataError as exc:
            assert problems and all(str(p) in str(exc) for p in problems)
        else:
            assert problems == []
            # what the validator passes, the loader takes, and every image stays inside the folder
            scans = load_dataset(root)
            assert len(scans) == len(valid["images"])
            assert all(root.resolve() in s.path.resolve().parents for s in scans)
    finally:
        (root / "annotations.json").write_text(json.dumps(valid))


@pytest.mark.parametrize(
    "text", ["", "{", "[]", "null", '"x"', "NaN", '{"images": [null, 1, "a"]}', "[" * 5000 + "]" * 5000]
)
def test_unparsable_or_wrongly_shaped_files_are_named(dataset: tuple[Path, dict[str, Any], Path], text: str) -> None:
    root, valid, _ = dataset
    (root / "annotations.json").write_text(text)
    try:
        problems = check_dataset(root)
        assert problems and all(isinstance(p, Problem) for p in problems)
        with pytest.raises(DataError, match="problem"):
            validate(root)
    finally:
        (root / "annotations.json").write_text(json.dumps(valid))
