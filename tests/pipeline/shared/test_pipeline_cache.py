"""The model cache: keys cover the data's content and stay byte-identical for unchanged configs and data
(trained models in users' caches are found again), the lock, the atomic publish and broken entries."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.shared import models
from pipeline.shared.cache import CacheScope, cache_lock, cache_root, cached_info, digest, load_cached, publish
from scans.fingerprint import dataset_fingerprint

# Entry names pinned when keys began to cover the bytes of every image (issue 18): the fixture's five
# images and annotations, the same ids and configs. Caches made before then retrain once.
EXPAND = ["unet.max_minutes=5", "riad.epochs=3", "detector.expand_up=0.2"]
UNET_KEYS = [
    ("default", [], "single", "unet-single-7a9d976a9a803847b4ec"),
    ("default", [], "riad", "unet-riad-3146a6e31f8cd29b2351"),
    ("quick", [], "single", "unet-single-5d419527e95ef71d7ec8"),
    ("paper", EXPAND, "single", "unet-single-9348992f1b41483d77bb"),
    ("quick", EXPAND, "riad", "unet-riad-f43a2eeacea7b61c46c4"),
]
REFINER_KEYS = [
    ("default", {}, "refiner-187dad8f5de0335c910b"),
    ("quick", {}, "refiner-0bfde5763abb69d76b21"),
    ("quick", {"steps": 7}, "refiner-907ea0896a55e46bb917"),
    ("quick", {"steps": 7, "iterations": 2}, "refiner-907ea0896a55e46bb917"),  # inference-only: same model
]
DETECTOR_KEYS = [
    ("default", [], "det-yolov5-fcd4532dcafecce05231"),
    ("quick", ["detector.options={epochs: 1, imgsz: 64, batch: 8, conf: 0.3}"], "det-yolov5-153fa8f88c28d73fbea7"),
]


class _Entry(Exception):
    """Raised instead of taking the lock: carries the entry a fitter would train or load."""


@pytest.fixture()
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    def lock(entry: Path) -> Any:
        raise _Entry(entry.name)

    monkeypatch.setattr(models, "cache_lock", lock)
    (tmp_path / "annotations.json").write_text("{}")
    files = [f"img{i}.png" for i in range(1, 6)]
    for i, name in enumerate(files):
        (tmp_path / name).write_bytes(bytes([i]) * 16)
    arrays = SimpleNamespace(ids=np.array([1, 2, 3, 4, 5]), labels=np.array([0, 0, 1, 0, 0]))
    data = SimpleNamespace(
        root=tmp_path, arrays=arrays, fingerprint=dataset_fingerprint(tmp_path, files, use_memo=False)
    )
    return SimpleNamespace(data=data, files=files, tr=np.arange(3), va=np.array([3, 4]))


def _entry(call: Any) -> str:
    with pytest.raises(_Entry) as hit:
        call()
    return str(hit.value)


@pytest.mark.parametrize("profile,sets,mode,expected", UNET_KEYS)
def test_unet_keys_are_unchanged(
    keys: SimpleNamespace, profile: str, sets: list[str], mode: Any, expected: str
) -> None:
    cfg = load_config(None, profile, sets)
    assert _entry(lambda: models.fit_unet(cfg, keys.data, keys.tr, keys.va, mode)) == expected


@pytest.mark.parametrize("profile,options,expected", REFINER_KEYS)
def test_refiner_keys_are_unchanged(keys: SimpleNamespace, profile: str, options: dict, expected: str) -> None:
    cfg = load_config(None, profile)
    where = models.scope(keys.data, cfg.image_size, cfg.frame, keys.tr, keys.va)
    refiner = {**cfg.detector.refiner, **options}
    call = lambda: models.fit_refiner(refiner, cfg.seed, where, Path("/c"), "cpu", keys.data.arrays, keys.tr, keys.va)  # noqa: E731
    assert _entry(call) == expected


@pytest.mark.parametrize("profile,sets,expected", DETECTOR_KEYS)
def test_detector_keys_are_unchanged(keys: SimpleNamespace, profile: str, sets: list[str], expected: str) -> None:
    cfg = load_config(None, profile, ["detector.name=yolov5", *sets])
    assert _entry(lambda: models.fit_detector(cfg, keys.data, keys.tr, keys.va, Path("/w"))) == expected


def test_keys_cover_the_bytes_of_every_image(keys: SimpleNamespace) -> None:
    """One image changed under the same name and annotations: every model trained on the data retrains."""
    cfg = load_config(None, "quick", ["detector.name=yolov5"])
    where = lambda: models.scope(keys.data, cfg.image_size, cfg.frame, keys.tr, keys.va)  # noqa: E731
    calls = [
        lambda: models.fit_unet(cfg, keys.data, keys.tr, keys.va, "single"),
        lambda: models.fit_detector(cfg, keys.data, keys.tr, keys.va, Path("/w")),
        lambda: models.fit_refiner(
            cfg.detector.refiner, 0, where(), Path("/c"), "cpu", keys.data.arrays, keys.tr, keys.va
        ),
    ]
    before = [_entry(c) for c in calls]
    (keys.data.root / keys.files[-1]).write_bytes(b"\xff" * 16)  # a validation image: its bytes, not its name
    keys.data.fingerprint = dataset_fingerprint(keys.data.root, keys.files, use_memo=False)
    after = [_entry(c) for c in calls]
    assert all(a != b for a, b in zip(before, after)), (before, after)


def test_a_broken_entry_is_named_moved_aside_and_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = tmp_path / "unet-single-1"
    publish(entry, lambda p: (p.mkdir(), (p / "model.pt").write_bytes(b"PK\x03\x04 truncated")), {"fit_s": 1.0})

    def load(path: Path) -> Any:
        import torch

        return torch.load(path / "model.pt", weights_only=True)

    assert load_cached(entry, load) is None
    err = capsys.readouterr().err
    assert f"cache entry {entry} cannot be loaded" in err and "retraining" in err
    assert not entry.exists() and len(list(tmp_path.glob("unet-single-1.broken-*"))) == 1
    publish(entry, lambda p: p.mkdir(), {"fit_s": 2.0})  # retrained
    assert load_cached(entry, lambda p: "model") == ("model", {"fit_s": 2.0})


def test_renamed_budget_keeps_its_old_key_name() -> None:
    assert models.legacy_names({"max_minutes": None}, {"max_minutes": ("max_train_seconds", 60.0)}) == {
        "max_train_seconds": None
    }
    assert models.refiner_key({"max_minutes": 1.0})["max_seconds"] == 60.0


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
    for path in (Path(__file__).resolve().parents[3] / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {"fcntl", "msvcrt"} & set(names), path
