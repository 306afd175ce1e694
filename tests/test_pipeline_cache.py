"""The model cache: keys stay byte-identical for unchanged configs (trained models in users' caches are
found again), the lock and the atomic publish."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pipeline import fit
from pipeline.cache import CacheScope, cache_lock, cache_root, cached_info, digest, publish
from pipeline.config import load_config

# Entry names computed by the pipeline before its configuration was typed (same data, ids and configs).
EXPAND = ["unet.max_minutes=5", "riad.epochs=3", "detector.expand_up=0.2"]
UNET_KEYS = [
    ("default", [], "single", "unet-single-903c6f9ffd79564b7202"),
    ("default", [], "riad", "unet-riad-df3e3071850112da9c94"),
    ("quick", [], "single", "unet-single-a680fbf1924254580287"),
    ("paper", EXPAND, "single", "unet-single-2bf0c4fbd53840165183"),
    ("quick", EXPAND, "riad", "unet-riad-ea9d98bcbb9cab59492f"),
]
REFINER_KEYS = [
    ("default", {}, "refiner-758bbddc9c39ecaa8e06"),
    ("quick", {}, "refiner-02666be23533609ace31"),
    ("quick", {"steps": 7}, "refiner-956182f20e9da9313a61"),
    ("quick", {"steps": 7, "iterations": 2}, "refiner-956182f20e9da9313a61"),  # inference-only: same model
]
DETECTOR_KEYS = [
    ("default", [], "det-yolov5-24052f2d6720578a321c"),
    ("quick", ["detector.options={epochs: 1, imgsz: 64, batch: 8, conf: 0.3}"], "det-yolov5-243865fc3dff433ecb18"),
]


class _Entry(Exception):
    """Raised instead of taking the lock: carries the entry a fitter would train or load."""


@pytest.fixture()
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    def lock(entry: Path) -> Any:
        raise _Entry(entry.name)

    monkeypatch.setattr(fit, "cache_lock", lock)
    (tmp_path / "annotations.json").write_text("{}")
    arrays = SimpleNamespace(ids=np.array([1, 2, 3, 4, 5]), labels=np.array([0, 0, 1, 0, 0]))
    return SimpleNamespace(data=SimpleNamespace(root=tmp_path, arrays=arrays), tr=np.arange(3), va=np.array([3, 4]))


def _entry(call: Any) -> str:
    with pytest.raises(_Entry) as hit:
        call()
    return str(hit.value)


@pytest.mark.parametrize("profile,sets,mode,expected", UNET_KEYS)
def test_unet_keys_are_unchanged(
    keys: SimpleNamespace, profile: str, sets: list[str], mode: Any, expected: str
) -> None:
    cfg = load_config(None, profile, sets)
    assert _entry(lambda: fit.fit_unet(cfg, keys.data, keys.tr, keys.va, mode)) == expected


@pytest.mark.parametrize("profile,options,expected", REFINER_KEYS)
def test_refiner_keys_are_unchanged(keys: SimpleNamespace, profile: str, options: dict, expected: str) -> None:
    cfg = load_config(None, profile)
    where = fit.scope(keys.data, cfg.image_size, cfg.frame, keys.tr, keys.va)
    refiner = {**cfg.detector.refiner, **options}
    call = lambda: fit.fit_refiner(refiner, cfg.seed, where, Path("/c"), "cpu", keys.data.arrays, keys.tr, keys.va)  # noqa: E731
    assert _entry(call) == expected


@pytest.mark.parametrize("profile,sets,expected", DETECTOR_KEYS)
def test_detector_keys_are_unchanged(keys: SimpleNamespace, profile: str, sets: list[str], expected: str) -> None:
    cfg = load_config(None, profile, ["detector.name=yolov5", *sets])
    assert _entry(lambda: fit.fit_detector(cfg, keys.data, keys.tr, keys.va, Path("/w"))) == expected


def test_renamed_budget_keeps_its_old_key_name() -> None:
    assert fit.legacy_names({"max_minutes": None}, {"max_minutes": ("max_train_seconds", 60.0)}) == {
        "max_train_seconds": None
    }
    assert fit.refiner_key({"max_minutes": 1.0})["max_seconds"] == 60.0


def test_scope_key_covers_data_ids_and_settings() -> None:
    base = CacheScope("abc", 128, 0, (1, 2), (3,))
    root = Path("/c")
    assert base.entry(root, "x", a=1) == base.entry(root, "x", a=1)
    others = [
        CacheScope("abd", 128, 0, (1, 2), (3,)).entry(root, "x", a=1),
        CacheScope("abc", 64, 0, (1, 2), (3,)).entry(root, "x", a=1),
        CacheScope("abc", 128, 1, (1, 2), (3,)).entry(root, "x", a=1),
        CacheScope("abc", 128, 0, (1,), (3,)).entry(root, "x", a=1),
        base.entry(root, "x", a=2),
        base.entry(root, "x", version=2, a=1),
    ]
    assert len({base.entry(root, "x", a=1), *others}) == len(others) + 1
    assert digest({"a": 1}) == digest(json.loads('{"a": 1}'))


def test_publish_is_atomic_and_marks_done(tmp_path: Path) -> None:
    entry = tmp_path / "models" / "m-1"
    assert cached_info(entry) is None
    with cache_lock(entry):
        assert (tmp_path / "models" / "m-1.lock").exists()

        def broken(path: Path) -> None:
            path.mkdir(parents=True)
            raise RuntimeError("killed while saving")

        with pytest.raises(RuntimeError):
            publish(entry, broken, {"fit_s": 1.0})
        assert cached_info(entry) is None and not entry.exists()  # a half-saved model is never taken
        publish(entry, lambda p: p.mkdir(parents=True), {"fit_s": 1.0})
    assert cached_info(entry) == {"fit_s": 1.0}


def test_cache_root_follows_the_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path))
    assert cache_root(None) == tmp_path / "models"
    assert cache_root(tmp_path / "mine") == tmp_path / "mine"


def test_pipeline_imports_no_posix_only_module() -> None:
    """``filelock`` replaces ``fcntl``, so ``pipeline`` imports on any OS."""
    for path in (Path(__file__).resolve().parent.parent / "pipeline").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {"fcntl", "msvcrt"} & set(names), path
