"""Cache keys are frozen: the entries of the detectors, the U-Net and the box refiner for the quick and
default configs, pinned at fab532e. A change here retrains every user's cached models: bump the
key's version constant in pipeline/shared/models.py on purpose, never by a refactor."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import detector_config_path, load_config
from pipeline.shared import models
from pipeline.shared.cache import CacheScope

ROOT = Path("/cache")
GOLDEN = {
    "quick/det-yolov5": "det-yolov5-c467280fb1d4571fffbe",
    "quick/det-codetr": "det-codetr-a756c12fe46b2080d459",
    "quick/unet-single": "unet-single-5ae7b117ba065bd47b90",
    "quick/unet-riad": "unet-riad-eae690b597b5e2609d7a",
    "quick/unet-single-member1": "unet-single-8e5a5b51dc664ccd829a",
    "quick/refiner": "refiner-d0974a2b113dd0c2657e",
    "default/det-yolov5": "det-yolov5-71cbb38e9e67eb77530c",
    "default/det-codetr": "det-codetr-9f8854b959ba53671262",
    "default/unet-single": "unet-single-a79e3540399e040e472f",
    "default/unet-riad": "unet-riad-63230f8154741e3cf2c5",
    "default/unet-single-member1": "unet-single-3503af067299d7035464",
    "default/refiner": "refiner-6933dc928ba3021d8462",
}


def _scope(image_size: int, frame: int) -> CacheScope:
    return CacheScope("fingerprint", image_size, frame, (1, 2, 3), (4,))


@pytest.mark.parametrize("profile", ["quick", "default"])
@pytest.mark.parametrize("name", ["yolov5", "codetr"])
def test_detector_keys(profile: str, name: str) -> None:
    if name == "codetr":
        pytest.importorskip("mmengine")  # the key holds the parsed MMDetection config
    cfg = load_config(None, profile, [f"detector.name={name}"])
    d = cfg.detector
    kwargs = models.detector_kwargs(d, detector_config_path(name, d.config, cfg.profile), cfg.seed, "cpu")
    entry = models.detector_entry(name, kwargs, _scope(cfg.image_size, cfg.frame), ROOT)
    assert entry.name == GOLDEN[f"{profile}/det-{name}"]


@pytest.mark.parametrize("profile", ["quick", "default"])
def test_unet_keys(profile: str) -> None:
    cfg = load_config(None, profile)
    where = _scope(cfg.image_size, cfg.frame)
    assert models.unet_cache_dir(cfg, where, "single").name == GOLDEN[f"{profile}/unet-single"]
    assert models.unet_cache_dir(cfg, where, "riad").name == GOLDEN[f"{profile}/unet-riad"]
    assert models.unet_cache_dir(cfg, where, "single", 1).name == GOLDEN[f"{profile}/unet-single-member1"]


@pytest.mark.parametrize("profile", ["quick", "default"])
def test_refiner_keys(profile: str) -> None:
    cfg = load_config(None, profile)
    options = models.refiner_options(cfg.detector.refiner, cfg.seed)
    entry = models.refiner_entry(options, _scope(cfg.image_size, cfg.frame), ROOT)
    assert entry.name == GOLDEN[f"{profile}/refiner"]
