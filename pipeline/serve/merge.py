"""``python -m pipeline merge``: the ``predict`` output folders of one run's shards (``--shard K/N``) joined
into one (:func:`merge_outputs`), refusing folders that do not belong together."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.serve.predict.csv_rows import ERR_FIELDS, PRED_FIELDS, read_rows
from pipeline.serve.predict.inputs import check_paths
from pipeline.serve.predict.manifest import MANIFEST, describe, output_lock, read_manifest, settings_differ, shard_text
from runtime.io import atomic_write_text, confined


def _ends_cleanly(path: Path) -> bool:
    """Whether a CSV is missing, empty or ends with a newline (no row cut by a killed run)."""
    if not path.is_file() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _row_key(row: Mapping[str, str]) -> tuple[str, int, str]:
    frame = row.get("frame", "")
    return row["file"], int(frame) if frame.isdigit() else -1, row.get("reason", "")


def _csv_text(rows: list[dict[str, str]], fields: list[str]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(sorted(rows, key=_row_key))
    return text.getvalue()


def _check_shards(folders: list[Path], docs: list[dict[str, Any]]) -> dict[int, Path]:
    """Refuse folders of another bundle, of another split or holding the same shard; returns shard -> folder."""
    first, n = docs[0], docs[0]["shard"]["n"]
    owner: dict[int, Path] = {}
    for f, d in zip(folders, docs):
        if d["bundle"] != first["bundle"]:
            raise ValueError(
                f"merge: {f} was made with {describe(d['bundle'])} and {folders[0]} with "
                f"{describe(first['bundle'])}: merge only the folders of one bundle"
            )
        differ = settings_differ(d, first)
        if differ:
            raise ValueError(
                f"merge: {f} was made with {differ[0]} and {folders[0]} with {differ[1]}: "
                "merge the shards of one predict command"
            )
        if d["shard"]["n"] != n:
            raise ValueError(
                f"merge: {f} holds shard {shard_text(d['shard'])} and {folders[0]} shard "
                f"{shard_text(first['shard'])}: shards of two splits overlap; merge the shards of one K/N split"
            )
        for k in d["shard"]["k"]:
            if k in owner:
                raise ValueError(f"merge: {owner[k]} and {f} both hold shard {k}/{n}: merge each shard once")
            owner[k] = f
    return owner


def _gather(folders: list[Path]) -> tuple[list[tuple[Path, dict[str, str]]], list[dict[str, str]]]:
    """Every shard's prediction rows (with their folder) and error rows; refuses a file found in two folders."""
    preds: list[tuple[Path, dict[str, str]]] = []
    errors: list[dict[str, str]] = []
    where: dict[str, Path] = {}
    for f in folders:
        for name, fields in (("predictions.csv", PRED_FIELDS), ("errors.csv", ERR_FIELDS)):
            path = f / name
            if not _ends_cleanly(path):
                raise ValueError(f"merge: {path} ends in a cut row: rerun that shard's predict to finish it")
            rows = read_rows(path, fields)
            for r in rows:
                seen = where.setdefault(r["file"], f)
                if seen != f:
                    raise ValueError(f"merge: {r['file']} is in both {seen} and {f}: the folders overlap")
            if name == "errors.csv":
                errors += rows
            else:
                preds += [(f, r) for r in rows]
    return preds, errors


def _bring(preds: list[tuple[Path, dict[str, str]]], out: Path, move: bool) -> tuple[int, int]:
    """Copy (or move) the overlay and DICOM files the rows name into ``out``; returns (brought, missing)."""
    brought = missing = 0
    for f, r in preds:
        for rel in [r["overlay"], *r["dicom"].split(";")]:
            if not rel:
                continue
            src, dst = confined(f, rel), confined(out, rel)
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                if move:
                    shutil.move(src, dst)
                else:
                    shutil.copy2(src, dst)
            elif not (move and dst.is_file()):  # a rerun of an interrupted --move finds it in place
                missing += 1
                continue
            brought += 1
    return brought, missing


def merge_outputs(folders: Sequence[Path], out: Path, move: bool = False, review: bool = True) -> dict[str, Any]:
    """Join the ``predict`` output folders of one run's shards into ``out``.

    Writes ``predictions.csv`` and ``errors.csv`` (sorted by file and frame), the overlay and DICOM
    files their rows name (copied, or moved with ``move``), ``predict.json`` and the review page.
    Refuses folders made with another bundle or runtime, shards of another split, a shard given
    twice, a file found in two folders, and an ``out`` that already holds results. Returns the row
    and file counts, the shards merged and missing, and the review page's path.
    """
    folders, out = [Path(f) for f in folders], Path(out)
    if not folders:
        raise ValueError("merge: name at least one predict output folder")
    for f in folders:
        check_paths(f, out)
    with output_lock(out), _shards_idle(folders):
        return _merge(folders, out, move, review)


@contextlib.contextmanager
def _shards_idle(folders: list[Path]) -> Iterator[None]:
    """Hold the lock of every shard folder that has one, so none is merged while a ``predict`` writes it."""
    from filelock import FileLock, Timeout

    from pipeline.run_dirs import LOCK

    with contextlib.ExitStack() as stack:
        for f in folders:
            if not (f / LOCK).is_file():
                continue
            lock = FileLock(str(f / LOCK))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise ValueError(f"merge: {f} is being written by a running predict; wait for it to finish") from None
            except OSError:
                continue  # a read-only folder: no predict can be writing it
            stack.callback(lock.release)
        yield


def _merge(folders: list[Path], out: Path, move: bool, review: bool) -> dict[str, Any]:
    """:func:`merge_outputs` once ``out`` is locked."""
    if any(confined(out, n).exists() for n in ("predictions.csv", "errors.csv", MANIFEST)):
        raise ValueError(f"--out {out} already holds predict results: choose a new --out")
    docs = [read_manifest(f) for f in folders]
    owner = _check_shards(folders, docs)
    preds, errors = _gather(folders)
    brought, missing = _bring(preds, out, move)
    atomic_write_text(confined(out, "predictions.csv"), _csv_text([r for _, r in preds], PRED_FIELDS))
    atomic_write_text(confined(out, "errors.csv"), _csv_text(errors, ERR_FIELDS))
    n = docs[0]["shard"]["n"]
    manifest = {**docs[0], "shard": {"n": n, "k": sorted(owner)}, "merged_from": [str(f) for f in folders]}
    atomic_write_text(confined(out, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    page = None
    if review:
        from pipeline.serve.review import write_review

        page = write_review(out)
    return {
        "predictions": len(preds),
        "errors": len(errors),
        "files": brought,
        "missing_files": missing,
        "shards": sorted(owner),
        "missing_shards": sorted(set(range(n)) - set(owner)),
        "n": n,
        "review": page,
    }
