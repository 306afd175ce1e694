"""Save and load a U-Net as a plain ``state_dict`` (``model.pt``) plus its config (``model.json``).

Only tensors and plain data are written, so loading uses ``torch.load(weights_only=True)``.

>>> import tempfile, torch
>>> from reconstruction.unet import UNet, UNetConfig
>>> d = tempfile.mkdtemp(); net = UNet(UNetConfig.profile("tiny")).eval()
>>> _ = save_model(net, d, meta={"mode": "single"})
>>> net2, meta = load_model(d); x = torch.rand(1, 1, 32, 32)
>>> bool(torch.equal(net(x), net2(x))), meta["mode"]
(True, 'single')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from reconstruction.unet import UNet, UNetConfig
from scans.io import atomic_write, atomic_write_text

WEIGHTS = "model.pt"
CONFIG = "model.json"


def save_model(model: UNet, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``directory/model.pt`` (CPU state_dict) and ``directory/model.json`` (config + ``meta``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(d / WEIGHTS, lambda tmp: torch.save(state, tmp))
    atomic_write_text(d / CONFIG, json.dumps({"unet": model.config.to_dict(), "meta": meta or {}}, indent=2))
    return d


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """Rebuild the U-Net from ``model.json`` and load ``model.pt`` (weights only); returns ``(model.eval(), meta)``."""
    d = Path(directory)
    cfg = json.loads((d / CONFIG).read_text())
    model = UNet(UNetConfig.from_dict(cfg["unet"]))
    model.load_state_dict(torch.load(d / WEIGHTS, map_location=map_location, weights_only=True))
    return model.to(map_location).eval(), cfg.get("meta", {})
