"""The review page of a predict output folder: order, links, filters, no external assets, no identifiers."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline.review import write_review
from scans.io import write_png

FIELDS = ["file", "sop_instance_uid", "score", "verdict", "threshold", "box_source", "overlay", "mask", "patient_name"]


def _folder(out: Path, n: int = 7) -> list[dict[str, str]]:
    """A synthetic predict output folder: rows, overlays and masks, one error."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        stem = f"scan {i}-abc"  # a space: links must be URL-encoded
        write_png(out / "overlays" / f"{stem}.png", rng.integers(0, 255, (8, 8, 3)).astype(np.uint8))
        write_png(out / "masks" / f"{stem}.png", np.zeros((8, 8), np.uint8))
        score = float(rng.random())
        rows.append(
            {
                "file": f"sub/{stem}.dcm",
                "sop_instance_uid": f"1.2.3.{i}",
                "score": f"{score:.6g}",
                "verdict": "distended" if score >= 0.5 else "not distended",
                "threshold": "0.5",
                "box_source": "detector" if i % 2 else "fallback",
                "overlay": f"overlays/{stem}.png",
                "mask": f"masks/{stem}.png",
                "patient_name": "Doe^Jane",  # a column predict never writes: must not reach the page
            }
        )
    rows.append({**rows[0], "file": "evil.png", "score": "0.01", "overlay": "../outside.png", "mask": "/etc/passwd"})
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)
    (out / "errors.csv").write_text("file,reason\nbroken.dcm,no pixel data\n")
    return rows


def _data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert m
    return json.loads(m.group(1))


def test_review_page(tmp_path: Path) -> None:
    rows = _folder(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.png")}
    path = write_review(tmp_path)
    assert path == tmp_path / "review.html"
    page = path.read_text()
    HTMLParser().feed(page)
    data = _data(page)

    scores = [r["score"] for r in data["rows"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == len(rows)
    assert [r["file"] for r in data["rows"]][0] == max(rows, key=lambda r: float(r["score"]))["file"]
    assert data["errors"] == [{"file": "broken.dcm", "reason": "no pixel data"}]
    for r in data["rows"]:
        if r["file"] == "evil.png":
            assert r["overlay"] == "" and r["mask"] == ""  # outside the folder: no link
            continue
        assert not r["overlay"].startswith(("/", "http")) and "%20" in r["overlay"]
        assert (tmp_path / r["overlay"].replace("%20", " ")).is_file()
        assert r["verdict"] in ("distended", "not distended") and r["threshold"] == "0.5"
    assert "Doe^Jane" not in page and "patient_name" not in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//|@import|url\(|@font-face", page)
    assert "distended only" in page and "keydown" in page
    # thumbnails are links to the PNGs predict wrote: nothing re-encoded, nothing else written
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.png")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "errors.csv",
        "masks",
        "overlays",
        "predictions.csv",
        "review.html",
    ]


def test_review_escapes_script_breakers(tmp_path: Path) -> None:
    (tmp_path / "predictions.csv").write_text(
        'file,score,verdict,threshold\n"</script><script>alert(1)</script>.png",0.9,distended,0.5\n'
    )
    page = write_review(tmp_path, name="index.html").read_text()
    assert "</script><script>alert" not in page
    assert _data(page)["rows"][0]["file"] == "</script><script>alert(1)</script>.png"


def test_review_needs_a_predict_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="predictions.csv"):
        write_review(tmp_path)


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_review_script_parses(tmp_path: Path) -> None:
    _folder(tmp_path, n=2)
    page = write_review(tmp_path).read_text()
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1
    js = tmp_path / "page.js"
    js.write_text(scripts[0])
    res = subprocess.run(["node", "--check", str(js)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
