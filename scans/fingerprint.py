"""Content fingerprints of datasets, for cache keys: the bytes of every image plus ``annotations.json``.

A model trained on other pixels under the same annotations must not be reused (``docs/design.md``,
caches), so keys hash file contents, not names. Each file is hashed once (BLAKE2b) and the digest is
memoised by its resolved path, size, mtime, ctime and inode, in this process and on disk under
:func:`memo_home` (one JSON file per dataset folder, replaced atomically under a file lock), so a
warm fingerprint costs one ``stat`` per file. Touching a file rehashes it but keeps the fingerprint.

>>> import tempfile
>>> root = Path(tempfile.mkdtemp()); _ = (root / "annotations.json").write_text("{}")
>>> _ = (root / "a.png").write_bytes(b"pixels")
>>> memo = root / "memo"
>>> fp = dataset_fingerprint(root, ["a.png"], memo_dir=memo)
>>> len(fp), fp == dataset_fingerprint(root, ["a.png"], memo_dir=memo)
(32, True)
>>> _ = (root / "a.png").write_bytes(b"pixelz")
>>> fp == dataset_fingerprint(root, ["a.png"], memo_dir=memo)
False
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

from runtime.env import cache_home
from runtime.io import atomic_write_text

ANNOTATIONS = "annotations.json"
_CHUNK = 1 << 20
_MEMO_VERSION = 1

# (resolved path, size, mtime_ns, ctime_ns, inode) -> hex digest, for this process.
_MEMO: dict[tuple[str, int, int, int, int], str] = {}
_MEMO_LOCK = threading.Lock()


def memo_home(cache_dir: Path | str | None = None) -> Path:
    """Where per-file digests are remembered: ``fingerprints/`` under :func:`runtime.env.cache_home`."""
    return cache_home(cache_dir) / "fingerprints"


def _key(path: Path) -> tuple[str, int, int, int, int]:
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_digest(path: Path | str) -> str:
    """BLAKE2b-128 hex digest of a file's bytes, memoised in this process by (path, size, times, inode).

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "x"; _ = f.write_bytes(b"abc")
    >>> file_digest(f) == hashlib.blake2b(b"abc", digest_size=16).hexdigest()
    True
    """
    key = _key(Path(path))
    with _MEMO_LOCK:
        known = _MEMO.get(key)
    if known is None:
        known = _hash_file(key[0])
        with _MEMO_LOCK:
            _MEMO[key] = known
    return known


def _memo_file(root: Path, memo_dir: Path) -> Path:
    return memo_dir / (hashlib.sha256(str(root).encode()).hexdigest()[:24] + ".json")


def _read_memo(path: Path) -> dict[str, list[Any]]:
    """The on-disk memo ``{resolved path: [size, mtime_ns, ctime_ns, inode, digest]}``; a missing,
    unreadable or malformed memo is empty (it is only a cache)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) and doc.get("version") == _MEMO_VERSION else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 5}


def _still_valid(path: str, entry: list[Any]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] == entry[:4]


def _save_memo(path: Path, root: Path, fresh: dict[str, list[Any]]) -> None:
    """Merge ``fresh`` entries into the memo under a lock (concurrent writers keep each other's entries),
    dropping entries whose file changed or vanished; a read-only cache is skipped silently."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=60):
            merged = {k: v for k, v in _read_memo(path).items() if k not in fresh and _still_valid(k, v)}
            merged.update(fresh)
            doc = {"version": _MEMO_VERSION, "root": str(root), "files": dict(sorted(merged.items()))}
            atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
    except OSError:
        pass  # the memo only saves time; fingerprints never depend on it


def _relative_name(root: Path, path: Path) -> str:
    """The name a file enters the fingerprint under: relative to ``root`` when inside it, so a moved or
    copied dataset keeps its fingerprint; otherwise absolute."""
    absolute = Path(os.path.abspath(root / path))
    for base in (root, Path(os.path.realpath(root))):
        if absolute.is_relative_to(base):
            return absolute.relative_to(base).as_posix()
    return absolute.as_posix()


def dataset_fingerprint(
    root: Path | str, files: Iterable[Path | str], *, memo_dir: Path | str | None = None, use_memo: bool = True
) -> str:
    """A 32-hex fingerprint of ``root/annotations.json`` and the bytes of ``files`` (paths relative to
    ``root``, or absolute; order and repeats do not matter, names do).

    Each file's digest is memoised (in-process and in ``memo_dir``, default :func:`memo_home`); a missing
    or unreadable file raises ``OSError`` naming it. ``use_memo=False`` rehashes everything.
    """
    root = Path(os.path.abspath(root))
    names = {_relative_name(root, Path(f)) for f in files}
    names.add(ANNOTATIONS)
    memo_path = _memo_file(Path(os.path.realpath(root)), Path(memo_dir) if memo_dir else memo_home())
    on_disk = _read_memo(memo_path) if use_memo else {}
    fresh: dict[str, list[Any]] = {}
    lines = []
    for name in sorted(names):
        real, size, mtime, ctime, ino = key = _key(root / name)
        stamp = [size, mtime, ctime, ino]
        entry = on_disk.get(real)
        if use_memo and entry is not None and entry[:4] == stamp and isinstance(entry[4], str):
            digest = entry[4]
            with _MEMO_LOCK:
                _MEMO.setdefault(key, digest)
        else:
            digest = file_digest(real) if use_memo else _hash_file(real)
            fresh[real] = [*stamp, digest]
        lines.append(f"{name}\t{digest}\n")
    if use_memo and fresh:
        _save_memo(memo_path, root, fresh)
    h = hashlib.blake2b(b"loris-dataset-fingerprint-1\n", digest_size=16)
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()
