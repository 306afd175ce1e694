"""The rows ``predict`` writes: the columns of ``predictions.csv`` and ``errors.csv``, their cells (file names
that round-trip, cells no spreadsheet runs, masks as RLE), and the appenders and readers that keep both files
whole across a killed run.

File names in the CSVs (:func:`csv_name`, undone by :func:`decode_name`): a name that is not valid
UTF-8 or that holds a backslash is written escaped (``\\\\`` for a backslash, ``\\xNN`` for each byte
that is not UTF-8), and a cell that a spreadsheet would run as a formula (one starting with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return), or that starts with ``'``, gets a ``'`` in front
(OWASP's advice for CSV injection): strip one leading ``'`` to get the text back.
"""

from __future__ import annotations

import csv
import io
import locale
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.io import confined
from scans.coco import decode_segmentation
from scans.readers import ReadError

CROP_FIELDS = ["crop_x0", "crop_y0", "crop_x1", "crop_y1", "crop_source"]
PRED_FIELDS = [
    "file",
    "frame",
    "sop_instance_uid",
    "score",
    "probability",
    "verdict",
    "threshold",
    "box_x1",
    "box_y1",
    "box_x2",
    "box_y2",
    "box_source",
    "box_confidence",
    "mask_rle",
    "overlay",
    "width",
    "height",
    *CROP_FIELDS,
    "dicom",
    "orientation",  # the EXIF Orientation applied to the stored pixels before anything else (1: none)
]
ERR_FIELDS = ["file", "frame", "sop_instance_uid", "reason"]

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula (OWASP)
_ESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def safe_cell(text: str) -> str:
    """``text`` as a CSV cell that a spreadsheet shows as text and never runs: a cell starting with
    ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (OWASP, "CSV Injection"), or with ``'``,
    gets a ``'`` in front, so stripping one leading ``'`` from a cell that has one gives the text
    back. Characters no text file can hold (lone surrogates) are written as ``\\udcNN``.

    >>> safe_cell("=1+1"), safe_cell("'a"), safe_cell("a=b"), safe_cell("-x")
    ("'=1+1", "''a", 'a=b', "'-x")
    """
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "'" + text if text.startswith((*FORMULA_START, "'")) else text


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8: os.fsdecode gave surrogates
        return False
    return True


def csv_name(rel: str) -> str:
    """The ``file`` cell of a path relative to the input folder; :func:`decode_name` undoes it.

    A name that is valid UTF-8 and holds no backslash is written as it is; any other is escaped: a
    backslash as ``\\\\`` and each byte that is not UTF-8 as ``\\xNN``. Then :func:`safe_cell`
    (a ``'`` in front of a cell a spreadsheet would run). No two paths give one cell.

    >>> csv_name("a/b.png"), csv_name("=x.png"), csv_name(os.fsdecode(b"bad\\xff.png")), csv_name("a\\\\b")
    ('a/b.png', "'=x.png", 'bad\\\\xff.png', 'a\\\\\\\\b')
    """
    if "\\" in rel or not _is_utf8(rel):
        raw = rel.replace("\\", "\\\\").encode(sys.getfilesystemencoding(), "surrogateescape")
        rel = raw.decode("utf-8", "backslashreplace")
    return safe_cell(rel)


def decode_name(cell: str) -> str:
    """The path relative to the input folder that :func:`csv_name` wrote as the ``file`` cell ``cell``
    (a ``str`` that :mod:`os` and :class:`~pathlib.Path` take; for a name that is not UTF-8 it holds
    the bytes as surrogates, as :func:`os.fsdecode` gives them).

    >>> [decode_name(csv_name(n)) for n in ("a.png", "'=x", "-1", "a\\\\xff")]
    ['a.png', "'=x", '-1', 'a\\\\xff']
    >>> os.fsencode(decode_name("bad\\\\xff.png"))
    b'bad\\xff.png'
    """
    name = cell[1:] if cell.startswith("'") else cell
    if "\\" not in name:
        return name
    raw, pos = bytearray(), 0
    for m in _ESCAPE.finditer(name):
        raw += name[pos : m.start()].encode("utf-8")
        raw += b"\\" if m[1] == "\\" else bytes([int(m[1][1:], 16)])
        pos = m.end()
    raw += name[pos:].encode("utf-8")
    return os.fsdecode(bytes(raw))


def _drop_torn_tail(path: Path) -> None:
    """A kill during an append can leave half a row: cut the file back to its last newline."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def read_rows(path: Path, fields: list[str]) -> list[dict[str, str]]:
    """The rows of an output CSV from an earlier run, less a half row a killed run left at its end;
    refuses a file that is not text, not CSV or has other columns, naming it."""
    if not path.is_file() or path.stat().st_size == 0:
        return []
    data = path.read_bytes()
    end = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
    encoding = locale.getpreferredencoding(False)
    try:
        reader = csv.DictReader(io.StringIO(data[:end].decode(encoding), newline=""))
        header, rows = reader.fieldnames, list(reader)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not a LoRIS {path.name}: byte {exc.start} (0x{data[exc.start]:02x}) is not {encoding} text; "
            "choose a new --out, or move that file away"
        ) from None
    except csv.Error as exc:
        raise ValueError(
            f"{path} is not a LoRIS {path.name} ({exc}): choose a new --out, or move that file away"
        ) from None
    if header != fields:
        raise ValueError(
            f"{path} is not a LoRIS {path.name} of this version (its columns: {', '.join(header or [])[:200]}): "
            "choose a new --out"
        )
    return rows


class CsvAppender:
    """Appends CSV rows, each batch as one write that is flushed and synced, or undone when it fails."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        new = not path.is_file() or path.stat().st_size == 0
        self.fields = fields
        self.fh = open(path, "ab", buffering=0)
        if new:
            self._append([dict(zip(fields, fields))])

    def _append(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO()
        csv.DictWriter(text, fieldnames=self.fields).writerows(rows)
        data = memoryview(text.getvalue().encode(locale.getpreferredencoding(False)))
        fd = self.fh.fileno()
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[self.fh.write(data) :]
            os.fsync(fd)  # a killed run keeps every row written so far
        except OSError:
            os.ftruncate(fd, start)  # a failed append (a full disk) leaves no half row behind
            raise

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._append(rows)

    def close(self) -> None:
        self.fh.close()


def error_row(rel: str, reason: str, frame: int | str = "", uid: str | None = None) -> dict[str, Any]:
    """An ``errors.csv`` row; ``rel`` is the path relative to the input folder (see :func:`csv_name`)."""
    return {
        "file": csv_name(rel),
        "frame": frame,
        "sop_instance_uid": safe_cell(uid or ""),
        "reason": safe_cell(reason),
    }


def reason_of(exc: Exception) -> str:
    return exc.reason if isinstance(exc, ReadError) else f"{exc.__class__.__name__}: {exc}"


def probability_cell(p: float) -> str:
    """The ``probability`` cell: four decimals, or empty when the bundle has no calibration (NaN).

    >>> probability_cell(0.123456), probability_cell(float("nan"))
    ('0.1235', '')
    """
    return f"{p:.4f}" if np.isfinite(p) else ""


def decode_mask(row: Mapping[str, Any]) -> np.ndarray:
    """The boolean ``[height, width]`` mask of a ``predictions.csv`` row, in the scan's own pixels
    (its ``mask_rle``: COCO compressed RLE, column-major, as :func:`pycocotools.mask.encode` writes).

    >>> from scans.coco import encode_mask
    >>> mask = np.zeros((3, 4), bool); mask[1, 1:3] = True
    >>> row = {"mask_rle": encode_mask(mask)["counts"], "width": "4", "height": "3"}
    >>> row["mask_rle"], bool((decode_mask(row) == mask).all())
    ('41202', True)
    """
    h, w = int(row["height"]), int(row["width"])
    counts = str(row["mask_rle"]).removeprefix("'")  # the quote safe_cell puts before a leading '='
    return decode_segmentation({"size": [h, w], "counts": counts}, h, w)


def done_keys(out: Path) -> set[tuple[str, str]]:
    """``(file, frame)`` keys an earlier run finished (``file`` as :func:`csv_name` writes it);
    ``(file, "")`` for a file refused as a whole. Both CSVs are checked before a torn row is cut."""
    pred_csv, err_csv = confined(out, "predictions.csv"), confined(out, "errors.csv")
    rows = read_rows(pred_csv, PRED_FIELDS) + read_rows(err_csv, ERR_FIELDS)
    _drop_torn_tail(pred_csv)  # both are ours: the next append starts on a fresh line
    _drop_torn_tail(err_csv)
    return {(r["file"], r["frame"]) for r in rows}
