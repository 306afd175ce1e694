"""Importers: a source per format, imported, passes scans check with the same boxes; refusals write nothing."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from scans.__main__ import main
from scans.check import check_dataset
from scans.coco import load_coco
from scans.importers import FORMATS, ImportRefused, Options, converter, import_dataset
from scans.importers.core import parse_distended


@dataclass
class Truth:
    name: str  # base name
    patient: str
    distended: bool
    split: str
    width: int
    height: int
    box: tuple[float, float, float, float]

    @property
    def polygon(self) -> list[float]:
        """A diamond strictly inside the box."""
        x1, y1, x2, y2 = self.box
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        return [cx, y1 + 1, x2 - 1, cy, cx, y2 - 1, x1 + 1, cy]


SPLIT_OF = {"p1": "train", "p2": "val", "p3": "test"}


def truths(integer: bool = False) -> list[Truth]:
    rng = np.random.default_rng(1)
    out = []
    for k, patient in enumerate(("p1", "p2", "p3")):
        for j in range(2):
            d = (k + j) % 2 == 0
            w, h = 64 + 8 * k, 48 + 4 * j
            x1, y1 = rng.uniform(2, 12, 2)
            x2, y2 = x1 + rng.uniform(15, 30), y1 + rng.uniform(12, 20)
            box = tuple(float(np.round(v)) if integer else float(round(v, 2)) for v in (x1, y1, x2, y2))
            name = f"{patient}_{'distended' if d else 'normal'}_{j}.png"
            out.append(Truth(name, patient, d, SPLIT_OF[patient], w, h, box))  # type: ignore[arg-type]
    return out


def _image(path: Path, t: Truth) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = (np.random.default_rng(len(t.name)).random((t.height, t.width)) * 200 + 20).astype(np.uint8)
    cv2.imwrite(str(path), img)


def _mask(path: Path, t: Truth) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((t.height, t.width), np.uint8)
    x1, y1, x2, y2 = (int(round(v)) for v in t.box)
    m[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2] = 255
    cv2.imwrite(str(path), m)


def write_meta(path: Path, ts: list[Truth]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "patient", "distended"])
        for t in ts:
            w.writerow([t.name, t.patient, "yes" if t.distended else "no"])
    return path


def make_yolo(src: Path, ts: list[Truth]) -> Options:
    (src / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
    (src / "data.yaml").write_text("names: [recess]\ntrain: images/train\nval: images/val\ntest: images/test\n")
    for t in ts:
        _image(src / "images" / t.split / t.name, t)
        x1, y1, x2, y2 = t.box
        lines = [f"0 {(x1 + x2) / 2 / t.width} {(y1 + y2) / 2 / t.height} {(x2 - x1) / t.width} {(y2 - y1) / t.height}"]
        if t.distended:
            norm = [v / (t.width if i % 2 == 0 else t.height) for i, v in enumerate(t.polygon)]
            lines.append("0 " + " ".join(f"{v:.8f}" for v in norm))
        label = src / "labels" / t.split / t.name.replace(".png", ".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("\n".join(lines) + "\n")
    return Options(meta=write_meta(src.parent / "meta.csv", ts))


def make_voc(src: Path, ts: list[Truth]) -> Options:
    (src / "Annotations").mkdir(parents=True)
    (src / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("train", "val", "test"):
        stems = [t.name[:-4] for t in ts if t.split == split]
        (src / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    for t in ts:
        _image(src / "JPEGImages" / t.name, t)
        if t.distended:
            _mask(src.parent / "masks" / t.name, t)
        x1, y1, x2, y2 = t.box
        (src / "Annotations" / t.name.replace(".png", ".xml")).write_text(
            f"<annotation><folder>JPEGImages</folder><filename>{t.name}</filename>"
            f"<size><width>{t.width}</width><height>{t.height}</height><depth>1</depth></size>"
            f"<object><name>recess</name><bndbox><xmin>{x1 + 1:g}</xmin><ymin>{y1 + 1:g}</ymin>"
            f"<xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object></annotation>"
        )
    return Options(patient_pattern=r"^(?P<patient>p\d+)_(?P<distended>distended|normal)_", masks=src.parent / "masks")


def make_labelme(src: Path, ts: list[Truth]) -> Options:
    for t in ts:
        _image(src / t.patient / t.name, t)
        x1, y1, x2, y2 = t.box
        shapes = [{"label": "recess", "shape_type": "rectangle", "points": [[x2, y2], [x1, y1]]}]
        if t.distended:
            pts = t.polygon
            shapes.append(
                {"label": "recess", "shape_type": "polygon", "points": [pts[i : i + 2] for i in (0, 2, 4, 6)]}
            )
        doc = {"imagePath": t.name, "imageWidth": t.width, "imageHeight": t.height, "shapes": shapes, "imageData": None}
        (src / t.patient / t.name.replace(".png", ".json")).write_text(json.dumps(doc))
    return Options(patient_pattern=r"^(?P<patient>p\d+)_(?P<distended>distended|normal)_")


def make_cvat(src: Path, ts: list[Truth]) -> Options:
    subset = {"train": "Train", "val": "Validation", "test": "Test"}
    items = []
    for i, t in enumerate(ts):
        _image(src / "images" / t.name, t)
        x1, y1, x2, y2 = t.box
        shapes = f'<box label="recess" occluded="0" xtl="{x1}" ytl="{y1}" xbr="{x2}" ybr="{y2}" z_order="0"/>'
        if t.distended:
            pts = t.polygon
            shapes += '<polygon label="recess" points="' + ";".join(f"{pts[k]},{pts[k + 1]}" for k in (0, 2, 4, 6))
            shapes += '"/>'
        items.append(
            f'<image id="{i}" name="{t.name}" subset="{subset[t.split]}" width="{t.width}" height="{t.height}">'
            f"{shapes}</image>"
        )
    (src / "annotations.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?><annotations><version>1.1</version>' + "".join(items) + "</annotations>"
    )
    return Options(meta=write_meta(src.parent / "meta.csv", ts))


def make_csv(src: Path, ts: list[Truth]) -> Options:
    src.mkdir(parents=True)
    with open(src / "boxes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "x", "y", "w", "h", "patient", "distended", "split", "mask"])
        for t in ts:
            _image(src / "scans" / t.name, t)
            mask = ""
            if t.distended:
                mask = f"masks/{t.name}"
                _mask(src / mask, t)
            x1, y1, x2, y2 = t.box
            w.writerow([f"scans/{t.name}", x1, y1, x2 - x1, y2 - y1, t.patient, int(t.distended), t.split, mask])
    return Options()


MAKERS: dict[str, tuple[Callable[[Path, list[Truth]], Options], bool, str]] = {
    # format: (builder, integer boxes, source path relative to the builder's folder)
    "yolo": (make_yolo, False, ""),
    "voc": (make_voc, True, ""),
    "labelme": (make_labelme, False, ""),
    "cvat": (make_cvat, False, ""),
    "csv": (make_csv, False, "boxes.csv"),
}


def test_every_registered_format_has_a_round_trip_test() -> None:
    assert set(MAKERS) == set(FORMATS)


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    make, integer, file = MAKERS[fmt]
    ts = truths(integer)
    options = make(tmp_path / "src", ts)
    out = import_dataset(fmt, tmp_path / "src" / file, tmp_path / "out", options)
    assert check_dataset(out) == []
    scans = {s.path.name: s for s in load_coco(out / "annotations.json")}
    assert sorted(scans) == sorted(t.name for t in ts)
    for t in ts:
        s = scans[t.name]
        assert (s.patient, s.distended, s.width, s.height) == (t.patient, t.distended, t.width, t.height)
        assert s.box is not None and np.abs(np.subtract(s.box, t.box)).max() <= 0.5, (s.box, t.box)
        assert bool(s.segmentation) == t.distended
        assert s.anomaly_mask().any() == t.distended
    has_splits = fmt in ("yolo", "voc", "cvat", "csv")
    assert (out / "splits.json").is_file() == has_splits
    if has_splits:
        fold = json.loads((out / "splits.json").read_text())[0]
        by_id = {s.id: s.patient for s in scans.values()}
        for part, patient in (("train", "p1"), ("val", "p2"), ("test", "p3")):
            assert {by_id[i] for i in fold[part]} == {patient}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _no_trace(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_missing_and_ambiguous_items_are_listed_per_file_and_nothing_is_written(tmp_path: Path) -> None:
    ts = truths()
    options = make_yolo(tmp_path / "src", ts)
    rows = (tmp_path / "meta.csv").read_text().splitlines()
    (tmp_path / "meta.csv").write_text("\n".join(r for r in rows if not r.startswith(ts[1].name)) + "\n")
    two = tmp_path / "src" / "labels" / ts[2].split / ts[2].name.replace(".png", ".txt")
    two.write_text(two.read_text() + "0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "src" / "labels" / ts[3].split / ts[3].name.replace(".png", ".txt")).unlink()
    with pytest.raises(ImportRefused) as info:
        import_dataset("yolo", tmp_path / "src", tmp_path / "out", options)
    messages = [str(p) for p in info.value.problems]
    assert any(ts[1].name in m and "no patient id" in m for m in messages), messages
    assert any(ts[2].name in m and "2 boxes" in m for m in messages), messages
    assert any(ts[3].name in m and "no label file" in m for m in messages), messages
    _no_trace(tmp_path)


def test_labels_must_be_chosen_when_several(tmp_path: Path) -> None:
    ts = truths()
    options = make_labelme(tmp_path / "src", ts)
    doc_path = tmp_path / "src" / ts[0].patient / ts[0].name.replace(".png", ".json")
    doc = json.loads(doc_path.read_text())
    doc["shapes"].append({"label": "tendon", "shape_type": "rectangle", "points": [[1, 1], [5, 5]]})
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ImportRefused, match="1 problem") as info:
        import_dataset("labelme", tmp_path / "src", tmp_path / "out", options)
    assert "recess (9), tendon (1)" in str(info.value.problems[0])
    _no_trace(tmp_path)
    chosen = Options(patient_pattern=options.patient_pattern, label="recess")
    assert check_dataset(import_dataset("labelme", tmp_path / "src", tmp_path / "out", chosen)) == []


def test_distended_without_outline_and_conflicts_are_refused(tmp_path: Path) -> None:
    ts = truths(integer=True)
    options = make_voc(tmp_path / "src", ts)
    (tmp_path / "m.csv").write_text(f"file,patient\n{ts[0].name},someone-else\n")
    no_masks = Options(patient_pattern=options.patient_pattern, meta=tmp_path / "m.csv")
    with pytest.raises(ImportRefused) as info:
        import_dataset("voc", tmp_path / "src", tmp_path / "out", no_masks)
    messages = [str(p) for p in info.value.problems]
    distended = [t.name for t in ts if t.distended]
    assert all(any(n in m and "--masks" in m for m in messages) for n in distended), messages
    assert any(ts[0].name in m and "conflicting patient ids" in m for m in messages), messages
    _no_trace(tmp_path)


def test_existing_out_and_bad_pattern(tmp_path: Path) -> None:
    ts = truths()
    options = make_labelme(tmp_path / "src", ts)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ImportRefused, match="nothing was written"):
        import_dataset("labelme", tmp_path / "src", tmp_path / "out", options)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="named group"):
        import_dataset("labelme", tmp_path / "src", tmp_path / "new", Options(patient_pattern=r"(p\d+)"))
    with pytest.raises(ValueError, match="unknown import format"):
        converter("dicomseg")


def test_cli_import_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ts = truths()
    make_cvat(tmp_path / "src", ts)
    args = ["import", "--from", "cvat", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    assert main([*args, "--meta", str(tmp_path / "meta.csv")]) == 0
    assert "OK, 6 images (3 distended, 3 normal) from 3 patients" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert "no patient id" in err and "nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "out2").exists()


def test_parse_distended_words() -> None:
    assert [parse_distended(v) for v in ("TRUE", "n", "1", "normal", "", "2")] == [True, False, True, False, None, None]
