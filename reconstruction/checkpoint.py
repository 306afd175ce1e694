"""Save and load a U-Net as a plain ``state_dict`` (``model.pt``) plus its config (``model.json``).

Only tensors and plain data are written, so loading uses ``torch.load(weights_only=True)``
(:func:`runtime.io.load_weights`): a missing, corrupt or tampered file raises
:class:`runtime.io.CheckpointError` naming it (``docs/design.md``). ``model.json`` holds
``UNetConfig.to_dict()``, which leaves ``encoder`` out when it is ``"none"``: files saved before the
option existed load as ``"none"``, and such models save byte-identically. A pretrained-encoder U-Net
loads without its ImageNet weights package: the saved state holds the fine-tuned encoder.

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
from runtime.io import CheckpointError, atomic_write, atomic_write_text, load_meta, load_weights

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


def load_model(
    directory: str | Path, map_location: str | torch.device = "cpu", hint: str | None = None
) -> tuple[UNet, dict[str, Any]]:
    """Rebuild the U-Net from ``model.json`` and load ``model.pt`` (weights only); returns ``(model.eval(), meta)``.

    Any unreadable, corrupt or mismatched file raises :class:`runtime.io.CheckpointError` naming it;
    ``hint`` is the fix its message suggests (the default says to delete the file and retrain).
    """
    d = Path(directory)
    cfg = load_meta(d / CONFIG, hint=hint)
    try:
        # the saved state replaces any pretrained encoder weights, so they are not loaded (nor needed) here
        model = UNet(UNetConfig.from_dict(cfg["unet"]), pretrained=False)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError.about(d / CONFIG, f"is not a U-Net config ({type(exc).__name__}: {exc})", hint) from None
    load_weights(model, d / WEIGHTS, map_location=map_location, hint=hint)
    meta = cfg.get("meta", {})
    return model.to(map_location).eval(), meta if isinstance(meta, dict) else {}
