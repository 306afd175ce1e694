"""Prior-guided peers (reconstruction.peers.prior_guided): maps and scores in the prior box, in-box DRAEM anomalies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from reconstruction.peers import PEERS, Budget, build_peer, load_peer
from reconstruction.peers.prior_guided import SOURCE, InBoxPerlin, PriorPeer, in_box, predict_peer, uses_prior
from scans.records import ScanArrays, box_mask

SIZE = 64
BOX = (16.0, 12.0, 48.0, 44.0)
NAMES = ["patchcore_box", "padim_box", "draem_box"]
TINY: dict[str, dict[str, Any]] = {"draem_box": {"width": 8}, "padim_box": {"n_features": 32}}
TINY_BUDGET = Budget(epochs=1, batch_size=4, steps_per_epoch=2)

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest.py


def toy(n: int, seed: int, labels: list[int] | None = None) -> ScanArrays:
    """Textured 'scans' with one prior box each; label-1 scans carry a bright blob inside their box."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    imgs = 0.3 + 0.1 * np.sin(xx / 5.0)[None] + 0.04 * rng.standard_normal((n, SIZE, SIZE))
    lab = np.zeros(n, np.int64) if labels is None else np.asarray(labels, np.int64)
    boxes = np.tile(np.array(BOX, np.float32), (n, 1)) + rng.integers(-4, 5, (n, 1)).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE), bool)
    for i in np.flatnonzero(lab == 1):
        x1, y1, x2, y2 = boxes[i]
        cx, cy = rng.uniform(x1 + 8, x2 - 8), rng.uniform(y1 + 8, y2 - 8)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
        imgs[i][masks[i]] = 0.95
    ids = np.arange(n)
    return ScanArrays(
        imgs.clip(0, 1).astype(np.float32), boxes, masks, lab, ids, [f"p{i}" for i in ids], np.ones((n, 2))
    )


def prior_peer(name: str, **options: Any) -> PriorPeer:
    peer = build_peer(name, seed=0, **options)
    assert isinstance(peer, PriorPeer)
    return peer


@pytest.fixture(scope="module")
def data() -> dict[str, ScanArrays]:
    return {"normal": toy(12, 0), "test": toy(12, 3, labels=[0] * 6 + [1] * 6)}


def test_registry_rows_and_prior_flag() -> None:
    assert set(NAMES) <= set(PEERS)
    for name in NAMES:
        spec = PEERS[name]
        assert spec.source == SOURCE and spec.display.endswith("(in prior box)") and spec.gives_maps
        assert not spec.supervised and uses_prior(name) and getattr(spec.cls, "uses_prior", False)
        assert json.loads(json.dumps(spec.to_dict()))["source"] == "anomalib + prior (ours)"
    assert not uses_prior("patchcore") and not getattr(PEERS["draem"].cls, "uses_prior", False)
    with pytest.raises(ValueError, match="no_box must be one of"):
        in_box(np.zeros((1, 4, 4), np.float32), np.zeros((1, 4)), no_box="everywhere")


@pytest.mark.parametrize("name", NAMES)
def test_prior_peer_fits_scores_in_the_box_and_round_trips(
    name: str, data: dict[str, ScanArrays], tmp_path: Path
) -> None:
    peer = prior_peer(name, **TINY.get(name, {}))
    record = peer.fit(data["normal"], None, TINY_BUDGET)
    assert record["prior"]["score"] == "mean of the map inside the prior box" and record["prior"]["no_box"] == "image"
    test = data["test"]
    with pytest.raises(ValueError, match=f"{name} needs prior boxes"):
        peer.predict(test.images)
    with pytest.raises(ValueError, match="expected boxes"):
        peer.predict(test.images, boxes=test.boxes[:3])
    out = peer.predict(test.images, boxes=test.boxes)
    assert out.scores.shape == (len(test),) and out.scores.dtype == np.float32 and np.isfinite(out.scores).all()
    assert out.maps is not None and out.maps.shape == test.images.shape and out.maps.dtype == np.float32
    inside = np.stack([box_mask(b, SIZE, SIZE) for b in test.boxes])
    assert not out.maps[~inside].any() and out.maps[inside].any()  # zero outside the box only
    np.testing.assert_allclose(out.scores, [m[k].mean() for m, k in zip(out.maps, inside, strict=True)], rtol=1e-5)
    plain = build_peer(name.removesuffix("_box"), seed=0, **TINY.get(name, {}))
    if name != "draem_box":  # trained as the original: same raw map, cut to the box
        plain.fit(data["normal"], None, TINY_BUDGET)
        raw = plain.predict(test.images).maps
        assert raw is not None
        np.testing.assert_allclose(out.maps[inside], raw[inside], rtol=1e-5)
        np.testing.assert_array_equal(predict_peer(plain, test.images, test.boxes).maps, raw)  # boxes ignored
    np.testing.assert_array_equal(predict_peer(peer, test.images, test.boxes).scores, out.scores)
    peer.save(tmp_path / name)
    back = load_peer(tmp_path / name)
    assert isinstance(back, PriorPeer)
    again = back.predict(test.images, boxes=test.boxes)
    np.testing.assert_array_equal(again.scores, out.scores)
    assert again.maps is not None
    np.testing.assert_array_equal(again.maps, out.maps)
    assert back.record["prior"] == record["prior"]


def test_missing_boxes_follow_the_no_box_option(data: dict[str, ScanArrays]) -> None:
    test = data["test"]
    boxes = test.boxes.copy()
    boxes[0] = np.nan
    for no_box in ("image", "zero"):
        peer = prior_peer("patchcore_box", no_box=no_box)
        peer.fit(data["normal"], None, "quick")
        out = peer.predict(test.images, boxes=boxes)
        assert out.maps is not None
        if no_box == "image":
            assert out.maps[0].all() and out.scores[0] == pytest.approx(float(out.maps[0].mean()), rel=1e-5)
        else:
            assert not out.maps[0].any() and out.scores[0] == 0.0
    with pytest.raises(ValueError, match="no_box must be one of"):
        build_peer("patchcore_box", no_box="nope").fit(data["normal"], None, "quick")


def test_patchcore_box_separates_a_blob_in_the_box(data: dict[str, ScanArrays]) -> None:
    peer = prior_peer("patchcore_box")
    peer.fit(data["normal"], None, "quick")
    test = data["test"]
    out = peer.predict(test.images, boxes=test.boxes)
    assert roc_auc_score(test.labels, out.scores) > 0.8
    assert out.maps is not None
    blob = np.mean([out.maps[i][test.masks[i]].mean() for i in range(6, 12)])
    rest = np.mean([out.maps[i][box_mask(test.boxes[i], SIZE, SIZE) & ~test.masks[i]].mean() for i in range(6, 12)])
    assert blob > rest  # inside the box, the map points at the blob


def test_draem_box_anomalies_stay_inside_each_box() -> None:
    torch.manual_seed(0)
    img = torch.rand(6, 3, SIZE, SIZE)
    boxes = np.array(
        [[8, 8, 24, 30], [30, 4, 60, 20], [0, 40, 20, 64], [10, 10, 50, 50], [40, 40, 56, 56], [np.nan] * 4]
    )
    gen = InBoxPerlin(lambda batch: boxes, probability=1.0)
    aug, mask = gen(img)
    assert aug.shape == img.shape and mask.shape == (6, 1, SIZE, SIZE)
    for i, b in enumerate(boxes[:5]):
        outside = ~torch.from_numpy(box_mask(b, SIZE, SIZE))
        assert mask[i, 0][outside].sum() == 0 and torch.equal(aug[i][:, outside], img[i][:, outside])
        assert mask[i].sum() > 0  # redrawn until the anomaly reaches the box
    assert mask[5].sum() > 0  # no box: anywhere
    with pytest.raises(ValueError, match="batch"):
        gen(img[0])


def test_draem_box_trains_on_the_training_boxes(data: dict[str, ScanArrays]) -> None:
    peer = prior_peer("draem_box", width=8)
    record = peer.fit(data["normal"], None, TINY_BUDGET)
    assert record["steps"] == 2 and record["prior"]["boxed_train_scans"] == len(data["normal"])
    twin = prior_peer("draem_box", width=8)
    twin.fit(data["normal"], None, TINY_BUDGET)
    test = data["test"]
    np.testing.assert_array_equal(
        twin.predict(test.images, boxes=test.boxes).scores, peer.predict(test.images, boxes=test.boxes).scores
    )


def test_in_box_pools_with_the_same_inset_as_loris() -> None:
    from reconstruction.deviation import image_score
    from reconstruction.peers.prior_guided import in_box

    maps = np.zeros((1, 16, 16), np.float32)
    maps[0, 0, :] = 5.0  # the box's top edge: a seam, left out by the inset
    box = np.array([[0.0, 0.0, 16.0, 16.0]])
    assert in_box(maps, box)[1][0] > 0
    assert in_box(maps, box, inset=1 / 16)[1][0] == 0.0
    assert in_box(maps, box, inset=1 / 16)[1][0] == image_score(maps, box, region="box", inset=1 / 16)[0]
