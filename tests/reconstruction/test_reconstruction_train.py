"""Training, checkpoints, resume and inference of the reconstruction package (small, CPU-fast)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from reconstruction.checkpoint import load_model, save_model
from reconstruction.infer import reconstruct, riad_reconstruct
from reconstruction.train import BEST_DIR, LAST, TrainConfig, evaluate_loss, train_unet
from reconstruction.unet import UNet, UNetConfig
from scans.records import ScanArrays, box_mask

BOX = np.float32([10, 22, 54, 42])


def synthetic(n: int, n_distended: int = 0, size: int = 64, seed: int = 0) -> ScanArrays:
    """Bright textured images; normal: a thin dark line in the box, distended: a thick dark pocket."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 1, size // 8, size // 8), dtype=np.float32)
    smooth = torch.nn.functional.interpolate(
        torch.from_numpy(coarse), size=(size, size), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    images = 0.55 + 0.25 * smooth + 0.05 * rng.standard_normal((n, size, size)).astype(np.float32)
    labels = np.zeros(n, np.int64)
    labels[:n_distended] = 1
    rows = np.arange(size)[None, :, None]
    cols = np.arange(size)[None, None, :]
    centre = 32 + rng.integers(-2, 3, (n, 1, 1))
    half = np.where(labels == 1, 5, 1)[:, None, None]
    dark = (np.abs(rows - centre) <= half) & (cols >= 14) & (cols <= 50)
    images = np.where(dark, 0.08, images).clip(0, 1).astype(np.float32)
    boxes = np.tile(BOX, (n, 1))
    masks = dark & (labels == 1)[:, None, None]
    return ScanArrays(
        images, boxes, masks, labels, np.arange(n), [f"P{i}" for i in range(n)], np.ones((n, 2), np.float32)
    )


TINY = TrainConfig(unet=UNetConfig.profile("tiny"), progress=False, seed=0, epochs=1000, patience=50)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # the test machine is shared: two spinning torch threads on a busy 2-core box run 10x slower
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_lowers_validation_loss() -> None:
    tr, va = synthetic(16, seed=1), synthetic(8, seed=2)
    cfg = replace(TINY, max_epochs=4, lr=1e-3)
    torch.manual_seed(cfg.seed)
    fresh = evaluate_loss(
        UNet(cfg.unet), torch.from_numpy(va.images).unsqueeze(1) * 2 - 1, va.boxes, cfg, torch.device("cpu")
    )
    res = train_unet(tr, va, cfg)
    assert res.epochs_run == 4 and res.stop_reason == "epochs"
    assert res.best_val_loss < 0.9 * fresh
    assert res.best_val_loss == min(h["val_loss"] for h in res.history)
    # the returned model holds the best weights: re-evaluating gives the best validation loss
    again = evaluate_loss(
        res.model, torch.from_numpy(va.images).unsqueeze(1) * 2 - 1, va.boxes, cfg, torch.device("cpu")
    )
    assert again == pytest.approx(res.best_val_loss, rel=1e-5)


def test_same_seed_same_run_and_resume_matches(tmp_path: Path) -> None:
    tr, va = synthetic(8, seed=1), synthetic(4, seed=2)
    cfg = replace(TINY, max_epochs=3)
    straight = train_unet(tr, va, cfg, workdir=tmp_path / "a")
    twin = train_unet(tr, va, cfg)
    assert _same_weights(straight.model, twin.model)
    part = train_unet(tr, va, replace(cfg, max_epochs=1), workdir=tmp_path / "b")
    assert part.epochs_run == 1 and (tmp_path / "b" / LAST).is_file()
    resumed = train_unet(tr, va, cfg, workdir=tmp_path / "b")
    assert resumed.epochs_run == 3
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in straight.history]
    assert _same_weights(straight.model, resumed.model)
    with pytest.raises(ValueError, match="different config"):
        train_unet(tr, va, replace(cfg, lr=1e-3), workdir=tmp_path / "b")
    ck = torch.load(tmp_path / "b" / LAST, weights_only=True)  # plain data only
    assert ck["epoch"] == 3


def test_checkpoint_round_trips_to_identical_outputs(tmp_path: Path) -> None:
    tr = synthetic(4, seed=1)
    res = train_unet(tr, tr, replace(TINY, max_epochs=1), workdir=tmp_path)
    loaded, meta = load_model(tmp_path / BEST_DIR)
    assert meta["mode"] == "single" and meta["epochs_run"] == 1
    a = reconstruct(res.model, tr.images, tr.boxes, device="cpu")
    b = reconstruct(loaded, tr.images, tr.boxes, device="cpu")
    assert np.array_equal(a.recon, b.recon) and all(np.array_equal(a.maps[k], b.maps[k]) for k in a.maps)
    save_model(loaded, tmp_path / "copy")
    again, _ = load_model(tmp_path / "copy")
    assert _same_weights(loaded, again)


def test_early_stopping_and_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import reconstruction.train as rt

    tr = synthetic(4, seed=1)
    scripted = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.3])  # validation losses, one per epoch
    monkeypatch.setattr(rt, "evaluate_loss", lambda *a, **k: next(scripted))
    stopped = train_unet(tr, tr, replace(TINY, patience=2, max_epochs=10))
    assert stopped.stop_reason == "patience" and stopped.epochs_run == 4 and stopped.best_epoch == 1
    assert stopped.best_val_loss == 0.5
    monkeypatch.undo()
    timed = train_unet(tr, tr, replace(TINY, max_minutes=1e-9, max_epochs=10))
    assert timed.stop_reason == "time" and timed.epochs_run == 1
    assert TrainConfig().max_minutes is None  # the time cap is opt-in: by default the epochs end a run


def test_resume_refuses_a_checkpoint_past_the_budget(tmp_path: Path) -> None:
    """A workdir trained for more epochs than this run's budget is not passed off as this budget;
    extending the budget resumes (test_same_seed_same_run_and_resume_matches)."""
    tr = synthetic(4, seed=1)
    train_unet(tr, tr, replace(TINY, max_epochs=2), workdir=tmp_path)
    with pytest.raises(ValueError, match="more than this run's budget"):
        train_unet(tr, tr, replace(TINY, max_epochs=1), workdir=tmp_path)
    assert train_unet(tr, tr, replace(TINY, max_epochs=2), workdir=tmp_path).epochs_run == 2  # same budget: done


def test_rejects_distended_or_boxless_training_scans() -> None:
    with pytest.raises(ValueError, match="distended"):
        train_unet(synthetic(4, 1), None, TINY)
    tr = synthetic(4)
    with pytest.raises(ValueError, match="box"):
        train_unet(tr, None, TINY, train_boxes=np.full((4, 4), np.nan, np.float32))


def test_box_overrides_are_used() -> None:
    tr = synthetic(4)
    res = train_unet(tr, None, replace(TINY, max_epochs=1), train_boxes=np.tile(np.float32([0, 0, 8, 8]), (4, 1)))
    assert res.epochs_run == 1 and np.isfinite(res.best_val_loss)


def test_reconstruct_returns_every_map_and_composite_keeps_outside() -> None:
    data = synthetic(5, 2)
    net = UNet(UNetConfig.profile("tiny"))
    out = reconstruct(
        net, data.images, data.boxes, maps=("msgmsd", "gmsd", "ssim", "dd", "l2"), batch_size=2, device="cpu"
    )
    assert out.recon.shape == (5, 64, 64) and out.recon.dtype == np.float32
    assert 0 <= out.recon.min() and out.recon.max() <= 1
    assert set(out.maps) == {"msgmsd", "gmsd", "ssim", "dd", "l2"} and all(
        m.shape == (5, 64, 64) for m in out.maps.values()
    )
    comp = reconstruct(net, data.images, data.boxes, maps=("dd",), device="cpu", composite=True, channels_last=False)
    outside = ~box_mask(BOX, 64, 64)
    assert np.array_equal(comp.recon[:, outside], data.images[:, outside]) and comp.maps["dd"][:, outside].max() == 0
    assert np.allclose(comp.recon[:, ~outside], out.recon[:, ~outside], atol=1e-5)  # same network output in the box


def test_riad_mode_trains_and_infers() -> None:
    tr = synthetic(4)
    res = train_unet(tr, tr, replace(TINY, mode="riad", max_epochs=1, riad_ks=(4, 8)))
    out = riad_reconstruct(res.model, tr.images, ks=(4, 8), batch_size=3, device="cpu")
    assert set(out.maps) == {"riad", "msgmsd", "gmsd", "ssim", "dd"}
    assert out.maps["riad"].shape == (4, 64, 64) and np.isfinite(out.maps["riad"]).all()


def _phantom(n: int, n_distended: int, size: int, seed: int) -> ScanArrays | None:
    try:
        import tempfile

        from scans.dataset import load_dataset, to_arrays
        from scans.phantom import generate_dataset
    except ImportError:
        return None
    root = generate_dataset(
        Path(tempfile.mkdtemp()) / "ph", n, n_distended, max(2, n // 4), size=size, seed=seed, progress=False
    )
    return to_arrays(load_dataset(root), size=size)


def _dd_gap(data: ScanArrays, cfg: TrainConfig) -> tuple[float, float]:
    normal = np.flatnonzero(data.labels == 0)
    tr, va = normal[: len(normal) * 3 // 4], normal[len(normal) * 3 // 4 :]
    res = train_unet(data.subset(tr), data.subset(va), cfg)
    test = np.concatenate([va, np.flatnonzero(data.labels == 1)])
    out = reconstruct(res.model, data.images[test], data.boxes[test], maps=("dd",), device="cpu")
    from reconstruction.deviation import image_score

    s = image_score(out.maps["dd"], data.boxes[test], pooling="mean", region="box")
    lab = data.labels[test]
    return float(s[lab == 1].mean()), float(s[lab == 0].mean())


def test_dd_in_box_is_higher_on_distended_synthetic() -> None:
    data = synthetic(40, 10, seed=5)
    dist, norm = _dd_gap(data, replace(TINY, max_epochs=6, lr=1e-3))
    assert dist > 1.5 * norm


@pytest.mark.slow
def test_dd_in_box_is_higher_on_distended_phantom() -> None:
    # 15 epochs (about 40 s): enough for the distended pockets to stand out in the DD map
    data = _phantom(96, 30, 64, seed=0)
    if data is None:
        pytest.skip("scans.phantom not available")
    dist, norm = _dd_gap(data, replace(TINY, unet=UNetConfig.profile("cpu"), max_epochs=15, lr=1e-3))
    assert dist > 1.1 * norm


def test_folded_batchnorm_inference_matches_plain_module_call() -> None:
    net = UNet(UNetConfig.profile("cpu"))
    net.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            net(torch.rand(4, 1, 64, 64) * 2 - 1)
    data = synthetic(3)
    fast = reconstruct(net, data.images, data.boxes, device="cpu")
    plain = reconstruct(net, data.images, data.boxes, device="cpu", fold_bn=False, channels_last=False)
    assert np.abs(fast.recon - plain.recon).max() < 1e-5
    assert all(np.abs(fast.maps[k] - plain.maps[k]).max() < 1e-4 for k in fast.maps)


def test_two_epochs_on_four_scans() -> None:
    rng = np.random.default_rng(0)
    n = 4
    arr = ScanArrays(
        rng.random((n, 32, 32), dtype=np.float32),
        np.tile(np.float32([8, 8, 20, 16]), (n, 1)),
        np.zeros((n, 32, 32), bool),
        np.zeros(n, np.int64),
        np.arange(n),
        ["p"] * n,
        np.ones((n, 2), np.float32),
    )
    res = train_unet(arr, arr, TrainConfig(unet=UNetConfig.profile("tiny"), max_epochs=2, progress=False))
    assert (res.epochs_run, len(res.history)) == (2, 2)


def test_train_config_defaults_are_configs_default_yaml() -> None:
    import yaml

    from pipeline.config import CONFIG_DIR, LOSS_WEIGHT_ORDER

    unet = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())["unet"]
    tc = TrainConfig()
    assert [getattr(tc, k) for k in ("epochs", "patience", "lr", "batch_size")] == [
        unet[k] for k in ("epochs", "patience", "lr", "batch_size")
    ]
    assert [getattr(tc.loss_weights, term) for term in LOSS_WEIGHT_ORDER] == unet["loss_weights"]


def test_loss_weights_are_read_from_the_yaml_list_by_name() -> None:
    from pipeline.config import load_config
    from pipeline.shared.models import train_config

    cfg = load_config(None, "quick", ["unet.loss_weights=[3.0, 2.0, 0.5]"])
    tc = train_config(cfg.unet, cfg.riad, "single", cfg.seed, "cpu", False)
    assert (tc.loss_weights.msgms, tc.loss_weights.ssim, tc.loss_weights.l2) == (3.0, 2.0, 0.5)
    d = tc.to_dict()
    assert (d["msgms_weight"], d["ssim_weight"], d["l2_weight"]) == (3.0, 2.0, 0.5) and "loss_weights" not in d
