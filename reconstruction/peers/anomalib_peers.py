"""Table 1 peers from anomalib 2.x, run through its torch models with a small fixed-budget fit loop.

Only anomalib's ``torch_model`` modules, losses and anomaly generators are used: no Lightning
trainer, logger or data module, so nothing is downloaded. Backbones are timm's
``tf_efficientnet_lite0`` with the ImageNet weights of :mod:`reconstruction.peers.backbones`
(``pretrained=False`` in the record when the weights package is missing); grayscale is replicated to
three channels and normalised with the backbone's mean and std (0.5, 0.5). Each training loop follows
the method's anomalib Lightning ``training_step`` and optimiser settings (see ``docs/design.md``).

>>> from reconstruction.peers.base import PEERS
>>> [n for n in sorted(PEERS) if PEERS[n].source == "anomalib"]
['cflow', 'draem', 'ganomaly', 'padim', 'patchcore', 'supersimplenet']
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

with warnings.catch_warnings():  # anomalib 2.7 warns about its own deprecated timm/dinov2 imports
    warnings.simplefilter("ignore", FutureWarning)
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor
    from anomalib.models.image.cflow import torch_model as cflow_tm
    from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d
    from anomalib.models.image.draem.loss import DraemLoss
    from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork, DraemModel, ReconstructiveSubNetwork
    from anomalib.models.image.ganomaly.loss import DiscriminatorLoss, GeneratorLoss
    from anomalib.models.image.ganomaly.torch_model import GanomalyModel
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from anomalib.models.image.supersimplenet import torch_model as ssn_tm
    from anomalib.models.image.supersimplenet.loss import SSNLoss
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from reconstruction.peers.backbones import BACKBONE, Lite0Peer
from reconstruction.peers.base import Budget, Peer, batches, fit_steps, gray3, mean_loss, register_peer, to_batch
from scans.records import ScanArrays


def _module(m: object) -> nn.Module:
    if not isinstance(m, nn.Module):
        raise TypeError(f"expected a torch module, got {type(m)}")
    return m


class _BackbonePeer(Lite0Peer):
    """A peer whose features come from a frozen ImageNet EfficientNet-Lite0 (option ``pretrained``).

    Its anomalib model returns ``pred_score`` and ``anomaly_map`` for the 3-channel normalised image.
    """

    @abstractmethod
    def _timm_modules(self) -> list[nn.Module]:
        """The timm backbone modules inside ``self.net`` that take the ImageNet weights."""

    def _init_backbone(self) -> None:
        self._load_imagenet(self._timm_modules())
        for m in self._timm_modules():
            m.eval()

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.net(gray3(x))  # type: ignore[misc]
        return out.pred_score, out.anomaly_map


class _MemoryBankPeer(_BackbonePeer):
    """PatchCore and PaDiM: one no-grad pass of the training images, then :meth:`_fit_bank` builds the bank.

    The budget's ``epochs`` are ignored (one pass, as anomalib's one-epoch Lightning fit).
    """

    budgets = {
        "quick": Budget(epochs=1, batch_size=8),
        "default": Budget(epochs=1, batch_size=8, work_size=128),
        "paper": Budget(epochs=1, batch_size=32),
    }

    def _timm_modules(self) -> list[nn.Module]:
        return [_module(_module(_module(self.net).feature_extractor).feature_extractor)]

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        net = _module(self.net)
        self._init_backbone()
        images = np.asarray(train.images, np.float32)
        net.train()
        _module(net.feature_extractor).eval()
        with torch.no_grad():
            for s in range(0, len(images), budget.batch_size):
                net(gray3(to_batch(images, np.arange(s, min(s + budget.batch_size, len(images))), self.device)))
            return self._fit_bank()

    @abstractmethod
    def _fit_bank(self) -> dict:
        """Build the memory bank from the stored features (under no-grad); return record entries."""


# ---- PatchCore -------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 20  # float32 elements of the per-step difference buffer (4 MiB)


def k_center_greedy(embedding: Tensor, sampling_ratio: float, chunk_rows: int | None = None) -> Tensor:
    """Coreset indices ``[int(n * sampling_ratio)]`` (int64) by k-center greedy: anomalib 2.7's ``KCenterGreedy``
    (same sparse random projection, eps 0.9, same random draws, same distances, first index on ties), so the
    same picks under the same seeds, but on buffers allocated once.

    anomalib allocates a fresh ``n x k`` difference (``features - center``) at every step. When that is just
    under glibc's 32 MiB mmap ceiling (29440 patches x 254 projected dimensions = 29.9 MB: a 240-image
    phantom fold) the blocks come from the heap once the dynamic mmap threshold has risen, and the small
    allocations between steps split each freed block, so every step took a new one: resident memory grew
    by gigabytes until the kernel killed the run. Here the difference goes, chunk by chunk of
    ``chunk_rows`` rows (default: 4 MiB), into one preallocated buffer and the distances into preallocated
    vectors, so a step allocates nothing but tensor views; no autograd graph is built.
    """
    with torch.no_grad():
        bank = embedding.detach()
        n = int(bank.shape[0])
        size = int(n * sampling_ratio)
        if size <= 0:
            raise ValueError(f"coreset size must be positive: {n} patches x coreset ratio {sampling_ratio}")
        if bank.ndim == 2:
            features = SparseRandomProjection(eps=0.9).fit(bank).transform(bank)
        else:
            features = bank.reshape(n, -1)
        features = features.contiguous()
        k = int(features.shape[1])
        rows = max(1, min(n, chunk_rows or _CHUNK_ELEMENTS // max(k, 1)))
        diff = features.new_empty(rows, k)
        dist = features.new_empty(n)
        min_dist = torch.full_like(dist, float("inf"))
        center = features.new_empty(1, k)
        best = features.new_empty(1)
        idx = torch.randint(high=n, size=(1,), device=features.device)  # anomalib's random first center
        selected = torch.empty(size, dtype=torch.long, device=features.device)
        selected[0:1] = idx
        for i in range(1, size):
            torch.index_select(features, 0, idx, out=center)
            for s in range(0, n, rows):
                e = min(s + rows, n)
                torch.sub(features[s:e], center, out=diff[: e - s])
                torch.linalg.vector_norm(diff[: e - s], 2, dim=1, out=dist[s:e])
            torch.minimum(min_dist, dist, out=min_dist)
            torch.max(min_dist, 0, keepdim=True, out=(best, idx))
            min_dist.index_fill_(0, idx, 0.0)  # a chosen center is never picked again
            selected[i : i + 1] = idx
        return selected


@register_peer("patchcore", display="PatchCore", source="anomalib", pretrained=True, reference="Roth et al. 2022 [24]")
class PatchCorePeer(_MemoryBankPeer):
    """Memory bank of backbone patch features, coreset-subsampled; score = reweighted nearest-neighbour distance."""

    defaults = {"layers": ["blocks.2", "blocks.4"], "coreset_ratio": 0.1, "num_neighbors": 9, "pretrained": True}

    def _build(self, size: int) -> nn.Module:
        o = self.options
        return PatchcoreModel(
            layers=list(o["layers"]), backbone=BACKBONE, pre_trained=False, num_neighbors=o["num_neighbors"]
        )

    def _fit_bank(self) -> dict:
        """anomalib's ``PatchcoreModel.subsample_embedding`` with :func:`k_center_greedy` as the sampler."""
        net = self.net
        assert isinstance(net, PatchcoreModel)
        store = cast(list[Tensor], net.embedding_store)
        if not store:
            raise ValueError("patchcore: no patch features stored; cannot select a coreset")
        bank = torch.vstack(store).detach().to(torch.float32).contiguous()
        store.clear()
        idx = k_center_greedy(bank, float(self.options["coreset_ratio"]))
        net.memory_bank = bank.index_select(0, idx)
        return {"epochs": 1, "patches": int(bank.shape[0]), "memory_bank": int(net.memory_bank.shape[0])}


# ---- PaDiM -----------------------------------------------------------------------------------------
@register_peer("padim", display="PaDiM", source="anomalib", pretrained=True, reference="Defard et al. 2021")
class PadimPeer(_MemoryBankPeer):
    """A Gaussian per feature position; score = maximum Mahalanobis distance."""

    defaults = {"layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 100, "pretrained": True}

    def _build(self, size: int) -> nn.Module:
        o = self.options
        return PadimModel(backbone=BACKBONE, layers=list(o["layers"]), pre_trained=False, n_features=o["n_features"])

    def _fit_bank(self) -> dict:
        assert isinstance(self.net, PadimModel)
        self.net.fit()
        return {"epochs": 1}


# ---- CFlow -----------------------------------------------------------------------------------------
@register_peer("cflow", display="CFlow", source="anomalib", pretrained=True, reference="Gudovskiy et al. 2022 [8]")
class CflowPeer(_BackbonePeer):
    """Conditional normalising flows on backbone features with positional encoding; map = negative likelihood."""

    defaults = {
        "layers": ["blocks.2", "blocks.4"],
        "coupling_blocks": 8,
        "condition_vector": 128,
        "fiber_batch_size": 64,
        "clamp_alpha": 1.9,
        "lr": 1e-4,
        "pretrained": True,
    }
    budgets = {
        "quick": Budget(epochs=1, batch_size=4, steps_per_epoch=2),
        "default": Budget(epochs=5, batch_size=8, work_size=128),
        "paper": Budget(epochs=50, batch_size=16),
    }

    def _build(self, size: int) -> nn.Module:
        o = self.options
        return cflow_tm.CflowModel(
            backbone=BACKBONE,
            layers=list(o["layers"]),
            pre_trained=False,
            fiber_batch_size=o["fiber_batch_size"],
            condition_vector=o["condition_vector"],
            coupling_blocks=o["coupling_blocks"],
            clamp_alpha=o["clamp_alpha"],
        )

    def _timm_modules(self) -> list[nn.Module]:
        assert isinstance(self.net, cflow_tm.CflowModel)
        return [_module(self.net.encoder.feature_extractor)]

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        net = self.net
        assert isinstance(net, cflow_tm.CflowModel)
        self._init_backbone()
        opt = torch.optim.Adam([p for d in net.decoders for p in d.parameters()], lr=float(self.options["lr"]))
        images = np.asarray(train.images, np.float32)
        steps, last = 0, float("nan")
        net.decoders.train()
        for _, idx in batches(len(images), budget, rng):
            x = gray3(to_batch(images, idx, self.device))
            with torch.no_grad():
                act = net.encoder(x)
            total, count = 0.0, 0
            for li, layer in enumerate(net.pool_layers):
                e = act[layer].detach()
                b, c, h, w = e.shape
                cond = positional_encoding_2d(net.condition_vector, h, w).to(e.device)
                c_r = cond.unsqueeze(0).expand(b, -1, -1, -1).permute(0, 2, 3, 1).reshape(-1, net.condition_vector)
                e_r = e.permute(0, 2, 3, 1).reshape(-1, c)
                perm = torch.randperm(e_r.shape[0])
                fb = net.fiber_batch_size
                for s in range(0, e_r.shape[0], fb):
                    sel = perm[s : s + fb]
                    opt.zero_grad()
                    p_u, log_jac_det = net.decoders[li](e_r[sel], [c_r[sel]])
                    loss = -F.logsigmoid(get_logp(c, p_u, log_jac_det) / c)
                    loss.mean().backward()
                    opt.step()
                    steps += 1
                    total += float(loss.detach().sum())
                    count += int(loss.numel())
            last = total / max(count, 1)
        return {"steps": steps, "train_loss": last}


# ---- SuperSimpleNet --------------------------------------------------------------------------------
@contextmanager
def _no_hub_weights() -> Any:
    """SuperSimpleNet builds its TimmFeatureExtractor with timm weights from the hub: build it randomly instead."""
    names = vars(ssn_tm)
    original = names["TimmFeatureExtractor"]
    names["TimmFeatureExtractor"] = partial(TimmFeatureExtractor, pre_trained=False)
    try:
        yield
    finally:
        names["TimmFeatureExtractor"] = original


@register_peer(
    "supersimplenet",
    display="SuperSimpleNet",
    source="anomalib",
    pretrained=True,
    reference="Rolih et al. 2024, successor of SimpleNet [16]",
)
class SuperSimpleNetPeer(_BackbonePeer):
    """Feature adaptor + segmentation/detection head trained on Perlin-noised features (SimpleNet's successor)."""

    defaults = {"layers": ["blocks.2", "blocks.4"], "perlin_threshold": 0.2, "clip_norm": 1.0, "pretrained": True}
    budgets = {
        "quick": Budget(epochs=1, batch_size=4, steps_per_epoch=2),
        "default": Budget(epochs=12, batch_size=8, work_size=128),
        "paper": Budget(epochs=300, batch_size=32),
    }

    def _build(self, size: int) -> nn.Module:
        with _no_hub_weights():
            net = ssn_tm.SupersimplenetModel(
                perlin_threshold=float(self.options["perlin_threshold"]),
                backbone=BACKBONE,
                layers=list(self.options["layers"]),
                stop_grad=True,
                adapt_cls_features=False,
            )
        side = 2 * size // int(net.feature_extractor.feature_extractor.reductions[0])
        if side < 32:  # anomalib's feature-level Perlin noise draws scales up to 32 cells
            raise ValueError(
                f"supersimplenet: feature map {side} px is under 32 at image side {size}; use a larger image "
                "or an earlier first layer (e.g. layers=['blocks.1', 'blocks.2'])"
            )
        return net

    def _timm_modules(self) -> list[nn.Module]:
        assert isinstance(self.net, ssn_tm.SupersimplenetModel)
        return [_module(self.net.feature_extractor.feature_extractor.feature_extractor)]

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        net = self.net
        assert isinstance(net, ssn_tm.SupersimplenetModel)
        self._init_backbone()
        opt = torch.optim.AdamW(
            [
                {"params": net.adaptor.parameters(), "lr": 1e-4},
                {"params": net.segdec.parameters(), "lr": 2e-4, "weight_decay": 1e-5},
            ]
        )
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(budget.epochs * 0.8), int(budget.epochs * 0.9)], gamma=0.4
        )
        loss_fn = SSNLoss()
        images = np.asarray(train.images, np.float32)

        def loss_of(idx: np.ndarray) -> Tensor:
            x = gray3(to_batch(images, idx, self.device))
            labels = torch.zeros(x.shape[0], device=x.device)
            amap, score, masks, lab = net(images=x, masks=None, labels=labels)
            return loss_fn(pred_map=amap, pred_score=score, target_mask=masks, target_label=lab)

        clip = float(self.options["clip_norm"] or 0.0)
        return fit_steps(net, opt, len(images), budget, rng, loss_of, clip_norm=clip, scheduler=sched)


# ---- DRAEM -----------------------------------------------------------------------------------------
@register_peer("draem", display="DRAEM", source="anomalib", pretrained=False, reference="Zavrtnik et al. 2021 [29]")
class DraemPeer(Peer):
    """Reconstructive + discriminative sub-networks trained on synthetic anomalies.

    The anomaly source is never the DTD download: ``anomaly_source=None`` (default) is anomalib's
    procedural mode (Perlin-noise textures, no files); a folder path uses the images found there.
    Grayscale runs natively (1-channel reconstruction, 2-channel discriminator); the augmenter's
    3-channel output is averaged back to gray. ``width`` is the sub-networks' base width (paper 128).
    """

    defaults = {"width": 16, "anomaly_source": None, "beta": [0.1, 1.0], "lr": 1e-4}
    budgets = {
        "quick": Budget(epochs=1, batch_size=4, steps_per_epoch=2),
        "default": Budget(epochs=12, batch_size=8, work_size=128),
        "paper": Budget(epochs=700, batch_size=8),
    }

    def _build(self, size: int) -> nn.Module:
        w = int(self.options["width"])
        net = DraemModel(sspcab=False)
        net.reconstructive_subnetwork = ReconstructiveSubNetwork(in_channels=1, out_channels=1, base_width=w)
        net.discriminative_subnetwork = DiscriminativeSubNetwork(in_channels=2, out_channels=2, base_width=w)
        return net

    def _augmenter(self) -> PerlinAnomalyGenerator:
        src = self.options["anomaly_source"]
        if src is not None and not Path(src).is_dir():
            raise FileNotFoundError(f"draem: anomaly source folder {src} not found (None uses Perlin noise)")
        lo, hi = self.options["beta"]
        return PerlinAnomalyGenerator(anomaly_source_path=src, blend_factor=(float(lo), float(hi)))

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        net = self.net
        assert isinstance(net, DraemModel)
        augmenter = self._augmenter()
        opt = torch.optim.Adam(net.parameters(), lr=float(self.options["lr"]))
        loss_fn = DraemLoss()
        images = np.asarray(train.images, np.float32)

        def loss_of(idx: np.ndarray) -> Tensor:
            x = to_batch(images, idx, self.device)
            aug, mask = augmenter(x.expand(-1, 3, -1, -1))
            recon, pred = net(aug.mean(dim=1, keepdim=True).clamp(0, 1))
            return loss_fn(x, recon, mask, pred)

        rec = fit_steps(net, opt, len(images), budget, rng, loss_of)
        return {**rec, "anomaly_source": self.options["anomaly_source"] or "perlin"}

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.net(x)  # type: ignore[misc]
        return out.pred_score, out.anomaly_map


# ---- GANomaly --------------------------------------------------------------------------------------
@register_peer("ganomaly", display="GANomaly", source="anomalib", pretrained=False, reference="Akcay et al. 2019 [1]")
class GanomalyPeer(Peer):
    """Encoder-decoder-encoder GAN; score = latent distance. Image-level only (no map), as in the paper."""

    gives_maps = False
    defaults = {"n_features": 32, "latent": 100, "wadv": 1, "wcon": 50, "wenc": 1, "lr": 2e-4}  # paper width 64
    budgets = {
        "quick": Budget(epochs=1, batch_size=4, steps_per_epoch=2),
        "default": Budget(epochs=15, batch_size=8, work_size=128),
        "paper": Budget(epochs=15, batch_size=32),
    }

    def _build(self, size: int) -> nn.Module:
        o = self.options
        return GanomalyModel(
            input_size=(size, size),
            latent_vec_size=int(o["latent"]),
            num_input_channels=1,
            n_features=int(o["n_features"]),
        )

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        net = self.net
        assert isinstance(net, GanomalyModel)
        o = self.options
        g_loss_fn = GeneratorLoss(o["wadv"], o["wcon"], o["wenc"])
        d_loss_fn = DiscriminatorLoss()
        d_opt = torch.optim.Adam(net.discriminator.parameters(), lr=float(o["lr"]), betas=(0.5, 0.999))
        g_opt = torch.optim.Adam(net.generator.parameters(), lr=float(o["lr"]), betas=(0.5, 0.999))
        images = np.asarray(train.images, np.float32)
        steps, g_last, d_last = 0, float("nan"), float("nan")
        net.train()
        for _, idx in batches(len(images), budget, rng):
            x = to_batch(images, idx, self.device) * 2 - 1
            padded, fake, latent_i, latent_o = net(x)
            pred_real, _ = net.discriminator(padded)
            pred_fake, _ = net.discriminator(fake)
            g_loss = g_loss_fn(latent_i, latent_o, padded, fake, pred_real, pred_fake)
            g_opt.zero_grad()
            g_loss.backward(retain_graph=True)
            g_opt.step()
            pred_fake, _ = net.discriminator(fake.detach())
            pred_real, _ = net.discriminator(padded)
            d_loss = d_loss_fn(pred_real, pred_fake)
            d_opt.zero_grad()
            d_loss.backward()
            d_opt.step()
            if d_loss.item() < 1e-5:  # anomalib re-initialises a collapsed discriminator
                net.discriminator.apply(_weights_init)
            steps += 1
            g_last, d_last = g_loss.item(), d_loss.item()
        val_score = (
            mean_loss(
                lambda b: net.eval()(b * 2 - 1).pred_score.mean(), np.asarray(val.images, np.float32), self.device
            )
            if val is not None and len(val)
            else None
        )
        return {"steps": steps, "generator_loss": g_last, "discriminator_loss": d_last, "val_score": val_score}

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.net(x * 2 - 1).pred_score, None  # type: ignore[misc]


def _weights_init(m: nn.Module) -> None:
    name = m.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(m.weight.data, 0.0, 0.02)  # type: ignore[arg-type]
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight.data, 1.0, 0.02)  # type: ignore[arg-type]
        nn.init.constant_(m.bias.data, 0)  # type: ignore[arg-type]
