"""The review page of a predict output folder: order, links, filters, no external assets, no identifiers.

The Chromium tests load the page in Debian's headless ``chromium`` (skipped where it is not
installed) and read the DOM the page script built.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.serve.review import write_review
from runtime.io import write_png

FIELDS = [
    "file",
    "sop_instance_uid",
    "score",
    "verdict",
    "threshold",
    "box_source",
    "overlay",
    "mask_rle",
    "patient_name",
]
RLE = '{"size": [8, 8], "counts": "PPYo0"}'
# probability cells and what the page shows: tampered or odd values show nothing rather than a number
PROBS = {
    "0.004": "<1%",
    "0.5": "50%",
    "0.996": ">99%",
    "0.8749": "87%",
    "": "",
    "nan": "",
    "1.7": "",
    "+0.5": "",
    '=HYPERLINK("http://x.example","0.9")': "",
}


def _folder(out: Path, n: int = 7, overlays: bool = True, probs: bool = False) -> list[dict[str, str]]:
    """A synthetic predict output folder: rows, overlays (every third row without one), one error.

    Without ``probs`` there is no probability column (folders older than calibration); with it, row
    ``i`` has the ``i``-th cell of :data:`PROBS` (cyclically).
    """
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        stem = f"scan {i}-abc"  # a space: links must be URL-encoded
        overlay = ""
        if overlays and i % 3:
            overlay = f"overlays/{stem}.png"
            write_png(out / overlay, rng.integers(0, 255, (8, 8, 3)).astype(np.uint8))
        score = float(rng.random())
        rows.append(
            {
                "file": f"sub/{stem}.dcm",
                "sop_instance_uid": f"1.2.3.{i}",
                "score": f"{score:.6g}",
                "verdict": "distended" if score >= 0.5 else "not distended",
                "threshold": "0.5",
                "box_source": "detector" if i % 2 else "fallback",
                "overlay": overlay,
                "mask_rle": RLE,  # for machines, not for the page
                "patient_name": "Doe^Jane",  # a column predict never writes: must not reach the page
            }
        )
        if probs:
            rows[-1]["probability"] = list(PROBS)[i % len(PROBS)]
    rows.append({**rows[1], "file": "evil.png", "score": "0.01", "overlay": "../outside.png"})
    fields = [*FIELDS[:3], "probability", *FIELDS[3:]] if probs else FIELDS
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
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
    assert path == tmp_path / "index.html"
    page = path.read_text()
    HTMLParser().feed(page)
    data = _data(page)

    scores = [r["score"] for r in data["rows"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == len(rows)
    assert [r["file"] for r in data["rows"]][0] == max(rows, key=lambda r: float(r["score"]))["file"]
    assert data["errors"] == [{"file": "broken.dcm", "reason": "no pixel data"}]
    for r in data["rows"]:
        assert r["verdict"] in ("distended", "not distended") and r["threshold"] == "0.5"
        if r["file"] == "evil.png":
            assert r["overlay"] == ""  # outside the folder: no link
        elif r["file"].startswith(("sub/scan 0-", "sub/scan 3-", "sub/scan 6-")):
            assert "overlay" not in r  # predict wrote none: the page shows a placeholder
        else:
            assert not r["overlay"].startswith(("/", "http")) and "%20" in r["overlay"]
            assert (tmp_path / r["overlay"].replace("%20", " ")).is_file()
    assert all("probability" not in r for r in data["rows"])  # an older folder: no column, no values
    assert "Doe^Jane" not in page and "patient_name" not in page
    assert "mask_rle" not in page and "PPYo0" not in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//|@import|url\(|@font-face", page)
    assert "distended only" in page and "keydown" in page and "--overlays" in page
    # thumbnails are links to the PNGs predict wrote: nothing re-encoded, nothing else written
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.png")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors.csv", "index.html", "overlays", "predictions.csv"]


def test_review_probability(tmp_path: Path) -> None:
    _folder(tmp_path, n=len(PROBS), probs=True)
    page = write_review(tmp_path).read_text()
    data = _data(page)
    shown = {r["file"]: r.get("probability") for r in data["rows"]}
    for i, (cell, text) in enumerate(PROBS.items()):
        assert shown[f"sub/scan {i}-abc.dcm"] == (text or None), cell
    assert shown["evil.png"] == PROBS[list(PROBS)[1]]
    assert "HYPERLINK" not in page and "1.7" not in page  # odd cells do not reach the page at all
    assert '"score", "probability", "threshold"' in page  # the column, next to the score


def test_review_escapes_script_breakers(tmp_path: Path) -> None:
    (tmp_path / "predictions.csv").write_text(
        'file,score,verdict,threshold\n"</script><script>alert(1)</script>.png",0.9,distended,0.5\n'
    )
    page = write_review(tmp_path, name="review.html").read_text()
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


# --- in headless Chromium ---------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")


def chromium(home: Path, url: str, *args: str, budget_ms: int | None = 5000) -> tuple[str, str]:
    """Run headless Chromium on ``url`` with its profile, cache and HOME under ``home``: (stdout, stderr)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
    }
    cmd = [
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={home / 'profile'}",
        f"--disk-cache-dir={home / 'cache'}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--enable-logging=stderr",
        "--v=0",
        *([f"--virtual-time-budget={budget_ms}"] if budget_ms else []),
        *args,
        url,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=home)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout, res.stderr


def console_problems(stderr: str) -> list[str]:
    """Lines where the page wrote to the console or threw: headless logs every console call as ``CONSOLE``."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


class _Dom(HTMLParser):
    """The table rows (attributes and cell texts), header, thumbnails, placeholders and ``<html>`` attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[dict[str, str | None]] = []
        self.cells: list[list[str]] = []  # per row of ``rows``: the text of each cell
        self.head: list[str] = []
        self.imgs: list[str] = []
        self.notes: list[str] = []
        self.root: dict[str, str | None] = {}
        self._in_note = False
        self._text: list[str] | None = None  # the cell being read
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.root = a
        elif tag == "tr" and "data-file" in a:
            self.rows.append(a)
            self.cells.append([])
        elif tag == "img" and a.get("class") == "thumb":
            self.imgs.append(a.get("src") or "")
        elif tag == "th" or (tag == "td" and self.rows):
            self._text = []
        self._in_note = tag == "span" and a.get("class") == "noimg"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._text is not None:
            (self.head if tag == "th" else self.cells[-1]).append("".join(self._text))
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)
        if self._in_note:
            self.notes.append(data)
            self._in_note = False

    def column(self, name: str) -> list[str]:
        """The text of column ``name`` in each row."""
        return [cells[self.head.index(name)] for cells in self.cells]


def _natural(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@needs_chromium
def test_review_in_chromium(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = _folder(out, n=12, probs=True)
    page = write_review(out, page_size=5).as_uri()
    home = tmp_path / "chromium"

    dom, err = chromium(home, page, "--dump-dom")
    assert console_problems(err) == []
    d = _Dom(dom)
    by_score = sorted(rows, key=lambda r: -float(r["score"]))
    assert [r["data-file"] for r in d.rows] == [r["file"] for r in by_score[:5]]  # one page, highest first
    assert d.head == ["#", "overlay", "file", "score", "probability", "threshold", "verdict", "box source"]
    assert d.column("probability") == [PROBS[r["probability"]] for r in by_score[:5]]
    assert [float(r["data-score"] or "nan") for r in d.rows] == [float(r["score"]) for r in by_score[:5]]
    with_overlay = [r for r in by_score[:5] if r["overlay"]]
    assert len(d.imgs) == len(with_overlay) and d.notes.count("overlay not readable") == 0
    assert d.notes.count("no overlay (run predict with --overlays)") == 5 - len(with_overlay)
    assert float(d.root["data-ready-ms"] or 0) > 0 and float(d.root["data-load-ms"] or 0) > 0

    dom, err = chromium(home, page + "#sort=file&page=3", "--dump-dom")
    assert console_problems(err) == []
    by_file = sorted(rows, key=lambda r: _natural(r["file"]))  # "scan 10" after "scan 9"
    assert [r["data-file"] for r in _Dom(dom).rows] == [r["file"] for r in by_file[10:]]
    assert _Dom(dom).column("probability") == [PROBS[r["probability"]] for r in by_file[10:]]
    for p in (1, 2):  # with page 3 above, every row: every cell of PROBS (scans 0 to 8 by file)
        dom, err = chromium(home, page + f"#sort=file&page={p}", "--dump-dom")
        assert console_problems(err) == []
        want = by_file[5 * (p - 1) : 5 * p]
        assert _Dom(dom).column("probability") == [PROBS[r["probability"]] for r in want]
    dom, _ = chromium(home, page + "#filter=errors", "--dump-dom")
    assert [r["data-file"] for r in _Dom(dom).rows] == ["broken.dcm"]

    shot = tmp_path / "shot.png"
    _, err = chromium(home, page, f"--screenshot={shot}", "--window-size=1280,900")
    assert console_problems(err) == []
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (900, 1280)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # text, thumbnails and rules, not a blank page
    assert sorted(p.name for p in out.iterdir()) == ["errors.csv", "index.html", "overlays", "predictions.csv"]


@needs_chromium
def test_review_in_chromium_without_probability(tmp_path: Path) -> None:
    """A folder older than calibration (no probability column): the page works, its cells are empty."""
    _folder(tmp_path / "out", n=3)
    dom, err = chromium(tmp_path / "chromium", write_review(tmp_path / "out").as_uri(), "--dump-dom")
    assert console_problems(err) == []
    d = _Dom(dom)
    assert len(d.rows) == 4 and "probability" in d.head and d.column("probability") == [""] * 4
    assert all(re.fullmatch(r"0\.\d+", s) for s in d.column("score"))  # the neighbours still render


@needs_chromium
def test_chromium_check_sees_page_errors(tmp_path: Path) -> None:
    """The console check above fails on a broken page: here the embedded data is cut short."""
    _folder(tmp_path / "out", n=2)
    path = write_review(tmp_path / "out")
    path.write_text(re.sub(r'(id="data">)\{', r"\1{{", path.read_text()))
    dom, err = chromium(tmp_path / "chromium", path.as_uri(), "--dump-dom")
    assert any("Uncaught SyntaxError" in line for line in console_problems(err)), err[-2000:]
    assert _Dom(dom).rows == []
