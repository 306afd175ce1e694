"""Peers with the location prior inside them: the paper's future work as extra Table 1 rows (``docs/design.md``).

Three registered peers reuse the anomalib peers unchanged and add the prior box:

- ``patchcore_box`` and ``padim_box`` train exactly as ``patchcore`` and ``padim``; at predict the map
  is kept inside the prior box only and the image score is pooled there.
- ``draem_box`` trains DRAEM with its synthetic anomalies placed inside each training scan's box (the
  boxes of the ``train`` arrays, i.e. the ground truth): anomalib's Perlin anomaly mask is cut to the
  box, pixels outside the box stay the original image, and a draw whose mask misses the box is redrawn
  (up to 10 times, as anomalib does for an empty mask). It scores inside the box like the others.

Prior rule (recorded in ``record["prior"]``)
    ``predict(images, boxes=...)`` takes ``boxes`` ``[N, 4]`` ``(x1, y1, x2, y2)`` in the pixels of
    ``images`` (the data's side, not the model's work size; ground-truth or detector boxes). The map
    is set to 0 outside the box (every map of these methods is >= 0, so 0 is also their floor); the
    image score is the mean of the map over the box pixels, LoRIS's pooling
    (:func:`reconstruction.deviation.image_score` with ``region="box"``). A NaN row (no box) follows
    the option ``no_box``: ``"image"`` (default; the whole map kept and averaged, the same fallback as
    ``image_score``) or ``"zero"`` (map and score 0: no prior, no finding). Without ``boxes``,
    ``predict`` raises. Callers tell these peers by ``getattr(peer, "uses_prior", False)``,
    ``isinstance(peer, PriorPeer)`` or :func:`uses_prior` on a registry name, or call any peer through
    :func:`predict_peer` (boxes go to the prior peers only).

The other pooling rule (``compare``'s "· pooled over the whole image" rows)
    ``predict`` also returns ``image_scores``: the mean of the method's own full-image map (before it is
    cut to the box) over the whole image, computed in the same pass. The cut map's whole-image mean would
    only be the box mean times the box's share of the image, a box-size score rather than the method's.

>>> from reconstruction.peers.base import PEERS
>>> [n for n in sorted(PEERS) if uses_prior(n)]
['draem_box', 'padim_box', 'patchcore_box']
>>> PEERS["patchcore_box"].display, PEERS["patchcore_box"].source
('PatchCore (in prior box)', 'anomalib + prior (ours)')
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import Tensor

from reconstruction.deviation import image_score
from reconstruction.masking import box_masks
from reconstruction.peers.anomalib_peers import DraemPeer, PadimPeer, PatchCorePeer
from reconstruction.peers.base import Budget, P, Peer, PeerOutput, batches, peer_spec, register_peer
from scans.records import ScanArrays

SOURCE: Final = "anomalib + prior (ours)"
NO_BOX = ("image", "zero")


def uses_prior(name: str) -> bool:
    """Whether the registered peer ``name`` needs prior boxes at predict.

    >>> uses_prior("patchcore"), uses_prior("PatchCore_Box")
    (False, True)
    """
    return bool(getattr(peer_spec(name).cls, "uses_prior", False))


def in_box(
    maps: np.ndarray, boxes: np.ndarray, no_box: str = "image", inset: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``maps`` ``[N, S, S]`` restricted to ``boxes`` ``[N, 4]`` (0 outside) and their in-box mean scores ``[N]``,
    pooled as LoRIS pools (``inset``: :func:`reconstruction.deviation.image_score`).

    A NaN box keeps the whole map (``no_box="image"``) or zeroes it (``"zero"``).

    >>> m = np.ones((2, 4, 4), np.float32); m[:, 0, 0] = 9
    >>> r, s = in_box(m, np.array([[0, 0, 2, 2], [np.nan] * 4]))
    >>> float(r[0].sum()), s.tolist()
    (12.0, [3.0, 1.5])
    >>> in_box(m, np.array([[0, 0, 2, 2], [np.nan] * 4]), no_box="zero")[1].tolist()
    [3.0, 0.0]
    """
    if no_box not in NO_BOX:
        raise ValueError(f"no_box must be one of {NO_BOX}, got {no_box!r}")
    n, h, w = maps.shape
    sel = box_masks(boxes, h, w)[:, 0].numpy()
    missing = ~sel.reshape(n, -1).any(1)
    if no_box == "image":
        sel[missing] = True
    kept = np.where(sel, maps, np.float32(0)).astype(np.float32)
    scores = image_score(kept, boxes, pooling="mean", region="box", inset=inset).astype(np.float32)
    return kept, scores


@dataclass
class PooledOutput(PeerOutput):
    """A prior peer's output: ``scores`` and ``maps`` inside the box, and ``image_scores`` ``[N]``, the mean of
    its full-image map over the whole image (the other pooling rule)."""

    image_scores: np.ndarray | None = None


def register_box_peer(name: str, reference: str) -> Callable[[P], P]:
    """:func:`register_peer` for the prior variant ``<base>_box`` of the registered peer ``<base>``.

    Its table label is the base's with `` (in prior box)``, its source :data:`SOURCE`, and it starts from
    ImageNet weights when the base does.
    """
    base = peer_spec(name.removesuffix("_box"))
    return register_peer(
        name, display=f"{base.display} (in prior box)", source=SOURCE, pretrained=base.pretrained, reference=reference
    )


class PriorPeer(Peer):
    """A peer scored inside the prior box: ``predict(images, boxes=...)``; the method comes from the next base.

    ``isinstance(peer, PriorPeer)`` narrows a :class:`Peer` for type checkers; :func:`predict_peer` calls
    any peer with the boxes it needs.
    """

    uses_prior: ClassVar[bool] = True

    def fit(self, train: ScanArrays, val: ScanArrays | None = None, budget: Budget | str = "default") -> dict[str, Any]:
        if self.options["no_box"] not in NO_BOX:
            raise ValueError(f"{self.name}: no_box must be one of {NO_BOX}, got {self.options['no_box']!r}")
        super().fit(train, val, budget)
        self.record["prior"] = {
            "map": "0 outside the prior box",
            "score": "mean of the map inside the prior box",
            "no_box": self.options["no_box"],
            **self._prior_fit_record(train),
        }
        return dict(self.record)

    def predict(
        self, images: np.ndarray, batch_size: int = 16, *, boxes: np.ndarray | None = None, inset: float = 0.0
    ) -> PooledOutput:
        """Scores ``[N]`` and maps ``[N, S, S]`` inside ``boxes`` ``[N, 4]`` (x1, y1, x2, y2 in image pixels),
        the scores pooled inside each box shrunk by ``inset`` (the same rule as LoRIS's ``score.inset``),
        and ``image_scores``, the full map's whole-image mean."""
        if boxes is None:
            raise ValueError(
                f"{self.name} needs prior boxes: predict(images, boxes=[N, 4] x1, y1, x2, y2 in image pixels, "
                "NaN rows for no box)"
            )
        b = np.asarray(boxes, dtype=np.float64)
        n = int(np.shape(images)[0])
        if b.shape != (n, 4):
            raise ValueError(f"{self.name}: expected boxes [{n}, 4] for {n} images, got {b.shape}")
        out = super().predict(images, batch_size)
        assert out.maps is not None  # every prior peer gives maps
        maps, scores = in_box(out.maps, b, str(self.options["no_box"]), inset)
        whole = image_score(out.maps, pooling="mean", region="image").astype(np.float32)
        return PooledOutput(scores, maps, whole)

    def _prior_fit_record(self, train: ScanArrays) -> dict[str, Any]:
        return {}


@register_box_peer("patchcore_box", "PatchCore, Roth et al. 2022 [24], scored in the LoRIS prior box")
class PatchCoreBoxPeer(PriorPeer, PatchCorePeer):
    """PatchCore trained as ``patchcore``; map and score restricted to the prior box."""

    defaults = {**PatchCorePeer.defaults, "no_box": "image"}


@register_box_peer("padim_box", "PaDiM, Defard et al. 2021, scored in the LoRIS prior box")
class PadimBoxPeer(PriorPeer, PadimPeer):
    """PaDiM trained as ``padim``; map and score restricted to the prior box."""

    defaults = {**PadimPeer.defaults, "no_box": "image"}


def predict_peer(
    peer: Peer, images: np.ndarray, boxes: np.ndarray | None = None, batch_size: int = 16, inset: float = 0.0
) -> PeerOutput:
    """``peer.predict(images)``, with ``boxes`` ``[N, 4]`` (image pixels) and the pooling ``inset`` passed on
    to a prior peer.

    Peers without the prior ignore ``boxes``; a prior peer without them raises.
    """
    if isinstance(peer, PriorPeer):
        return peer.predict(images, batch_size, boxes=boxes, inset=inset)
    return peer.predict(images, batch_size)


class InBoxPerlin(PerlinAnomalyGenerator):
    """anomalib's Perlin anomaly generator with each image's anomaly cut to its box.

    ``box_of(batch)`` gives the ``[B, 4]`` boxes (image pixels, NaN: whole image) of the batch it is
    called on. Outside the box the image is returned unchanged and the mask is 0; a draw that made an
    anomaly wholly outside the box is redrawn, up to ``retries`` times.
    """

    def __init__(self, box_of: Callable[[Tensor], np.ndarray], retries: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.box_of = box_of
        self.retries = retries

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor]:
        if img.dim() != 4:
            raise ValueError(f"expected a [B, C, H, W] batch, got {tuple(img.shape)}")
        _, _, h, w = img.shape
        keep = box_masks(self.box_of(img), h, w, device=img.device)
        keep = keep | ~keep.flatten(1).any(1).view(-1, 1, 1, 1)  # no box: anywhere
        out, masks = [], []
        for x, k in zip(img, keep, strict=True):
            for _ in range(self.retries + 1):
                aug, mask = super().forward(x)
                inside = mask * k
                if not bool(mask.any()) or bool(inside.any()):  # no anomaly drawn, or one that reaches the box
                    break
            out.append(torch.where(k, aug, x))
            masks.append(inside)
        return torch.stack(out), torch.stack(masks)


class _BatchBoxes:
    """The boxes of each training batch, in the order ``DraemPeer._fit`` draws batches (a twin of its RNG)."""

    def __init__(self, images: np.ndarray, boxes: np.ndarray, budget: Budget, rng: np.random.Generator) -> None:
        self.images, self.boxes = images, boxes
        self._order: Iterator[tuple[int, np.ndarray]] = batches(len(images), budget, copy.deepcopy(rng))

    def __call__(self, batch: Tensor) -> np.ndarray:
        _, idx = next(self._order)
        if batch.shape[0] != len(idx) or not torch.equal(batch[:, 0].cpu(), torch.from_numpy(self.images[idx])):
            raise RuntimeError("draem_box: training batches out of step with their boxes")
        return self.boxes[idx]


@register_box_peer(
    "draem_box", "DRAEM, Zavrtnik et al. 2021 [29], synthetic anomalies and score in the LoRIS prior box"
)
class DraemBoxPeer(PriorPeer, DraemPeer):
    """DRAEM whose synthetic anomalies lie inside each training scan's box; scored inside the prior box."""

    defaults = {**DraemPeer.defaults, "no_box": "image"}

    def __init__(self, seed: int = 0, device: str = "cpu", **options: Any) -> None:
        super().__init__(seed, device, **options)
        self._box_of: _BatchBoxes | None = None

    def _augmenter(self) -> PerlinAnomalyGenerator:
        base = super()._augmenter()  # checks the anomaly source folder
        if self._box_of is None:
            raise RuntimeError("draem_box: the augmenter is built inside fit only")
        return InBoxPerlin(
            self._box_of, anomaly_source_path=self.options["anomaly_source"], blend_factor=base.blend_factor
        )

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        images = np.asarray(train.images, np.float32)
        self._box_of = _BatchBoxes(images, np.asarray(train.boxes, np.float64), budget, rng)
        try:
            return super()._fit(train, val, budget, rng)
        finally:
            self._box_of = None

    def _prior_fit_record(self, train: ScanArrays) -> dict[str, Any]:
        boxed = int(np.isfinite(np.asarray(train.boxes, np.float64)).all(1).sum())
        return {"anomalies": "inside each training scan's box (anywhere when it has none)", "boxed_train_scans": boxed}
