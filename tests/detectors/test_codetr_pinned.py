"""Golden test: a quick-profile Co-DETR fit on the CPU and its predictions, pinned bit for bit.

Why pinned: Co-DETR's fitted weights and boxes must be identical before and after the switch from a
source-built full mmcv 2.1.0 to mmcv-lite 2.1.0 (no compiled ``mmcv._ext``; LoRIS's stand-in,
detectors/codetr/mmcv_ext.py, takes its place). Every op Co-DETR runs on the CPU already took the
torch-native route before the switch (``native_ops.CPU_NATIVE`` is True for every op; deformable
attention and focal loss have no CPU kernel in mmcv at all), so compiled kernels never influenced CPU
results, and this fit must not move by a bit. The code from before the switch, run on mmcv-lite with
the stand-in (which raises on any compiled kernel), gave the same digest and predictions. From here on
the pins guard against any change to the model, the training loop, the augmentation, the native ops
or the seeding.

The fit is deterministic: two fits in one process and fits in two fresh processes gave the same
digest and bitwise-equal predictions. Float results depend on torch's version and on the CPU kernels
it dispatches to (``PINNED_ON``); there the digest and the 1e-5 comparison are asserted. Elsewhere
(another torch, another instruction set) the predictions are held to a looser tolerance that still
catches a changed model; to re-pin, run ``python tests/detectors/test_codetr_pinned.py`` and paste what it prints.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detectors import build_detector
from detectors.codetr import CoDetrDetector, load_config, mmcv_ext  # installs the mmcv._ext stand-in first
from detectors.codetr.native_ops import CPU_NATIVE
from runtime.device import torch_threads
from tests.helpers import pinned_environment, toy_box_scans

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "configs" / "detectors" / "codetr_quick.py"
THREADS = 2  # float reductions depend on the thread count: the fit and the predictions use exactly 2

# Where the pins below were taken: (torch release, torch's CPU kernel level).
PINNED_ON = ("2.14.1", "AVX512")
PINNED_DIGEST = "daa70c7e2f3dfaea65719a45f278bcd2829a8307df91f97df6145d83cd7c97f2"
PINNED_NUMEL = 4190193
# Top 3 detections of the first 3 images: [x1, y1, x2, y2] in the images' 64 px, and scores.
PINNED_BOXES: list[list[list[float]]] = [
    [
        [42.414745, 26.037655, 45.723324, 29.12196],
        [50.363415, 26.043041, 53.676586, 29.122906],
        [42.343269, 33.975971, 45.655228, 37.045406],
    ],
    [
        [10.403807, 18.058958, 13.718422, 21.137304],
        [50.387093, 18.130178, 53.696556, 21.194166],
        [41.436501, 41.515575, 54.564384, 53.993267],
    ],
    [
        [9.460903, 9.479624, 22.65815, 21.846302],
        [50.364716, 58.371784, 53.668228, 61.443356],
        [42.325695, 34.028671, 45.646641, 37.101952],
    ],
]
PINNED_SCORES: list[list[float]] = [
    [0.232582, 0.225172, 0.218519],
    [0.242426, 0.221609, 0.209282],
    [0.239118, 0.210337, 0.205799],
]


def state_digest(model: torch.nn.Module) -> tuple[str, int]:
    """sha256 of every state_dict tensor in key order as float32 bytes, and their total element count."""
    h = hashlib.sha256()
    numel = 0
    for value in model.state_dict().values():
        t = value.detach().cpu().to(torch.float32).contiguous()
        h.update(t.numpy().tobytes())
        numel += t.numel()
    return h.hexdigest(), numel


def fit_quick(workdir: Path) -> dict[str, Any]:
    """The quick profile's Co-DETR (its 5 epochs, validated after each) at 64 px on 16 toy scans in batches
    of 4 (20 steps; val: 4 of them), then its weights' digest and its top-3 predictions on 3 scans."""
    cfg = load_config(QUICK)
    assert cfg["train"]["epochs"] == 5 and cfg["train"]["val_interval"] == 1 and cfg["train"]["max_minutes"] is None
    cfg["image_size"] = 64
    cfg["train"] = {**cfg["train"], "batch_size": 4, "warmup_iters": 4, "seed": 0, "num_threads": THREADS}
    data = toy_box_scans(16, 64, seed=7)
    with torch_threads(THREADS):
        det: CoDetrDetector = build_detector("codetr", **cfg)  # type: ignore[assignment]
        summary = det.fit(data, data.subset([0, 1, 2, 3]), workdir)
        digest, numel = state_digest(det.model)
        dets = det.predict(data.images[:3])
    return dict(
        summary=summary,
        digest=digest,
        numel=numel,
        boxes=np.stack([d.boxes[:3] for d in dets]),
        scores=np.stack([d.scores[:3] for d in dets]),
    )


def test_quick_codetr_fit_and_predictions_are_pinned(tmp_path: Path) -> None:
    assert not mmcv_ext.compiled_ops()  # mmcv-lite: nothing compiled could take part
    assert all(CPU_NATIVE.values())  # and before the switch every CPU op was native too
    got = fit_quick(tmp_path / "work")
    assert got["summary"]["iterations"] == 20
    boxes, scores = np.asarray(PINNED_BOXES), np.asarray(PINNED_SCORES)
    assert got["boxes"].shape == boxes.shape == (3, 3, 4) and got["scores"].shape == scores.shape == (3, 3)
    printed = _pins(got)
    if pinned_environment() == PINNED_ON:
        assert (got["digest"], got["numel"]) == (PINNED_DIGEST, PINNED_NUMEL), printed
        np.testing.assert_allclose(got["boxes"], boxes, rtol=0, atol=1e-5, err_msg=printed)
        np.testing.assert_allclose(got["scores"], scores, rtol=0, atol=1e-5, err_msg=printed)
    else:  # other float kernels: the same model within rounding, not the same bits
        assert got["numel"] == PINNED_NUMEL, printed
        np.testing.assert_allclose(got["boxes"], boxes, rtol=0, atol=0.05, err_msg=printed)
        np.testing.assert_allclose(got["scores"], scores, rtol=0, atol=1e-3, err_msg=printed)


def _pins(got: dict[str, Any]) -> str:
    """The pin lines for this file, from a fit's results."""

    def nested(a: np.ndarray) -> str:
        return repr(np.round(a.astype(np.float64), 6).tolist())

    return "\n".join(
        [
            f"PINNED_ON = {pinned_environment()!r}",
            f'PINNED_DIGEST = "{got["digest"]}"',
            f"PINNED_NUMEL = {got['numel']}",
            f"PINNED_BOXES: list[list[list[float]]] = {nested(got['boxes'])}",
            f"PINNED_SCORES: list[list[float]] = {nested(got['scores'])}",
        ]
    )


if __name__ == "__main__":  # prints the pins for this environment
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(_pins(fit_quick(Path(tmp) / "work")), file=sys.stdout)
