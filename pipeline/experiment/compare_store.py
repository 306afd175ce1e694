"""Saving and reading back one method's result on one fold (``folds/<k>/compare/<method>.npz`` with its
replicates and figure maps, then ``<method>.json`` last), so that a killed comparison resumes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.aggregate import json_safe
from pipeline.experiment.compare_types import MethodFold, Reps, Rows
from pipeline.run_dirs import write_json
from runtime.io import atomic_write


def _npz_key(prefix: str, key: str) -> str:
    return f"{prefix}|{key.replace('/', '|')}"  # npz keys cannot hold "/" portably


def _savez(path: Path, arrays: dict[str, Any]) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def save_method(fdir: Path, mf: MethodFold, key: str) -> None:
    """Write one method's fold result: ``<name>.npz`` (replicates, figure maps), then ``<name>.json``."""
    arrays: dict[str, Any] = {_npz_key("test", k): v for k, v in mf.replicates.items()}
    for i, (_, reps) in enumerate(mf.external):
        arrays.update({_npz_key(f"external-{i}", k): v for k, v in reps.items()})
    for i, (m, s) in mf.figure.items():
        arrays[f"figure|{i}|map"], arrays[f"figure|{i}|seg"] = m, s
    fdir.mkdir(parents=True, exist_ok=True)
    atomic_write(fdir / f"{mf.name}.npz", lambda p: _savez(p, arrays))
    doc = {
        "key": key,
        "name": mf.name,
        "metrics": mf.metrics,
        "external": [m for m, _ in mf.external],
        "figure": sorted(mf.figure),
        "info": mf.info,
        "extra": mf.extra,
        "external_extra": mf.external_extra,
    }
    write_json(fdir / f"{mf.name}.json", json_safe(doc))


def _floats(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float("nan") if v is None else float(v) for k, v in d.items()}


def load_method(fdir: Path, name: str, key: str) -> MethodFold | None:
    """A method's saved fold result made under ``key``, else None (not finished, or made otherwise)."""
    path = fdir / f"{name}.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("key") != key:
        return None
    with np.load(fdir / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    part: dict[str, Reps] = {}
    for k, v in arrays.items():
        prefix, _, rest = k.partition("|")
        if prefix != "figure":
            part.setdefault(prefix, {})[rest.replace("|", "/")] = v
    figure = {int(i): (arrays[f"figure|{i}|map"], arrays[f"figure|{i}|seg"]) for i in doc["figure"]}
    external = [(_floats(m), part.get(f"external-{i}", {})) for i, m in enumerate(doc["external"])]
    extra, ext_extra = _rows(doc.get("extra", {})), [_rows(r) for r in doc.get("external_extra", [])]
    return MethodFold(
        name, _floats(doc["metrics"]), part.get("test", {}), external, figure, doc["info"], extra, ext_extra
    )


def _rows(d: Mapping[str, Mapping[str, Any]]) -> Rows:
    return {row: _floats(m) for row, m in d.items()}
