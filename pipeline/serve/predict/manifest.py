"""An output folder's ``predict.json`` (the bundle, backend, shard and settings that made it), the checks
that a rerun resumes only what this bundle, shard and settings began (:func:`check_resume`), and the
lock one writing process holds on the folder (:func:`output_lock`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.serve.bundle import Bundle
from pipeline.serve.bundle_file import bundle_digest
from pipeline.serve.predict.csv_rows import done_keys
from pipeline.serve.predict.engine import Job
from pipeline.serve.predict.options import Shard
from runtime.io import confined

MANIFEST = "predict.json"


def make_manifest(job: Job, bundle: Bundle, shard: Shard) -> dict[str, Any]:
    """``predict.json``: the bundle (and its backend, under ``runtime``) and the shard that made an output
    folder, for resume and merge."""
    return {
        "format": 1,
        "bundle": {
            "digest": bundle_digest(job.bundle_dir),
            "model_name": bundle.model_name,
            "model_version": bundle.model_version,
            "runtime": job.backend,
        },
        "shard": {"n": shard[1], "k": [shard[0]]},
        "read": {"crop": job.opts.crop, "region": job.opts.region, "frames": job.opts.frames},
        "overlays": job.outputs.overlays,
        "dicom_out": list(job.outputs.dicom),
    }


def describe(bundle: dict[str, Any]) -> str:
    return (
        f"{bundle.get('model_name')} version {bundle.get('model_version')} on {bundle.get('runtime')} "
        f"(files {str(bundle.get('digest'))[:12]})"
    )


def shard_text(shard: dict[str, Any]) -> str:
    return ",".join(f"{k}/{shard['n']}" for k in shard["k"])


def read_manifest(folder: Path) -> dict[str, Any]:
    """The ``predict.json`` of an output folder; refuses a folder without one, or a damaged one, naming it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a predict output folder, or one from an older version)")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a LoRIS {MANIFEST} ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != 1 or "bundle" not in doc or "shard" not in doc:
        raise ValueError(f"{path}: not a predict manifest of this version")
    return doc


# the settings that change what a row means, and the option that sets each: a resume must keep them
SETTINGS = {
    "--crop": ("read", "crop"),
    "--region": ("read", "region"),
    "--frames": ("read", "frames"),
    "--overlays": ("overlays",),
    "--dicom-out": ("dicom_out",),
}
_ABSENT = object()


def _setting(doc: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = doc
    for k in keys:
        if not isinstance(value, Mapping) or k not in value:
            return _ABSENT  # a manifest from before the setting was recorded
        value = value[k]
    return sorted(value) if isinstance(value, list) else value


def _show(option: str, value: Any) -> str:
    if option == "--overlays":
        return option if value else f"no {option}"
    if option == "--dicom-out":
        return f"{option} {','.join(value)}" if value else f"no {option}"
    return f"no {option}" if value is None else f"{option} {value}"


def settings_differ(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first setting two manifests differ in, as ``("--crop regions", "--crop auto")``; None when none."""
    for option, keys in SETTINGS.items():
        a, b = _setting(old, keys), _setting(new, keys)
        if a is not _ABSENT and b is not _ABSENT and a != b:
            return _show(option, a), _show(option, b)
    return None


def check_resume(out: Path, manifest: dict[str, Any]) -> set[tuple[str, str]]:
    """Refuse to continue ``out`` unless it was begun with this bundle, shard and settings (its
    ``predict.json``); returns the ``(file, frame)`` keys already done. Results without a
    ``predict.json`` are refused too, as are CSVs that are not LoRIS's. Nothing is written but the
    cut of a half row a killed run left."""
    path = confined(out, MANIFEST)
    if not path.is_file():
        found = [n for n in ("predictions.csv", "errors.csv") if confined(out, n).exists()]
        if found:
            raise ValueError(
                f"--out {out} holds {' and '.join(found)} but no {MANIFEST}, so the bundle and settings that "
                f"made them cannot be checked: restore its {MANIFEST}, or choose a new --out"
            )
        return set()
    old = read_manifest(out)
    if old["bundle"] != manifest["bundle"]:
        raise ValueError(
            f"--out {out} holds the results of {describe(old['bundle'])}, not of this bundle "
            f"({describe(manifest['bundle'])}): choose a new --out"
        )
    if old["shard"] != manifest["shard"]:
        raise ValueError(
            f"--out {out} holds shard {shard_text(old['shard'])}, not {shard_text(manifest['shard'])}: "
            "choose a new --out"
        )
    differ = settings_differ(old, manifest)
    if differ:
        raise ValueError(
            f"--out {out} was begun with {differ[0]} and this run has {differ[1]} (see {path}): "
            f"rerun with {differ[0]} to resume it, or choose a new --out"
        )
    return done_keys(out)


def _check_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder; choose another --out")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold ``<out>/.lock`` while the block writes ``out`` (``predict``, ``merge``, ``export``): a
    second process refuses at once (naming the holder's PID) before it writes anything, and the lock
    goes with the process, also when it is killed. The run folders' lock
    (:func:`pipeline.run_dirs.run_lock`), without its check that ``out`` holds a run: when the block
    wrote nothing, the lock file is removed, and so is ``out`` if this call created it."""
    from pipeline.run_dirs import run_lock

    with run_lock(Path(out), check=_check_folder) as locked:
        yield locked
