"""The peer interface, its registry and the shared plumbing (seeding, batching, save/load without pickles).

A peer is one Table 1 method (see ``docs/design.md``). Every peer is a :class:`Peer` subclass registered
with :func:`register_peer`; the pipeline lists :data:`PEERS` for its choices and labels.

>>> sorted(PEERS)[:2]
['cflow', 'draem']
>>> PEERS["patchcore"].source, PEERS["multitask"].supervised, PEERS["ganomaly"].gives_maps
('anomalib', True, False)
"""

from __future__ import annotations

import json
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from runtime.device import resolve_device
from runtime.io import load_meta
from scans.records import DISTENDED, ScanArrays

META = "peer.json"
WEIGHTS = "weights.safetensors"
_FORMAT = 1

Source = Literal["anomalib", "own implementation", "anomalib + prior (ours)"]


@dataclass(frozen=True)
class Budget:
    """A fixed training budget, counted in passes and batches (never wall time).

    ``epochs`` passes over the training set in batches of ``batch_size``; ``steps_per_epoch`` caps the
    batches of one pass (None: the whole set). Memory-bank peers (PatchCore, PaDiM) make one pass
    whatever ``epochs`` says. ``work_size`` (None: the data's size) is the side the model runs at:
    images are resized to it for training and scoring, and maps are resized back to the data's size.

    >>> Budget(epochs=2, batch_size=4).to_dict()
    {'epochs': 2, 'batch_size': 4, 'steps_per_epoch': None, 'work_size': None}
    """

    epochs: int
    batch_size: int = 8
    steps_per_epoch: int | None = None
    work_size: int | None = None

    def __post_init__(self) -> None:
        caps = (self.steps_per_epoch, self.work_size)
        if self.epochs < 1 or self.batch_size < 1 or any(c is not None and c < 1 for c in caps):
            raise ValueError(f"budget values must be at least 1, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PeerOutput:
    """``scores``: ``[N]`` float32, higher = more anomalous; ``maps``: ``[N, S, S]`` float32 or None."""

    scores: np.ndarray
    maps: np.ndarray | None = None


@dataclass(frozen=True)
class PeerSpec:
    """How the pipeline lists a peer: registry name, table label, where the code comes from."""

    name: str
    display: str
    source: Source
    pretrained: bool
    supervised: bool
    gives_maps: bool
    reference: str
    cls: type[Peer] = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cls")
        return d


PEERS: dict[str, PeerSpec] = {}

P = TypeVar("P", bound="type[Peer]")


def register_peer(
    name: str,
    *,
    display: str,
    source: Source,
    pretrained: bool,
    reference: str = "",
) -> Callable[[P], P]:
    """Class decorator that adds a peer to :data:`PEERS` under ``name`` (lower case, unique)."""

    def deco(cls: P) -> P:
        if name in PEERS:
            raise ValueError(f"peer {name!r} is already registered")
        if name != name.lower():
            raise ValueError(f"peer names are lower case, got {name!r}")
        cls.name = name
        PEERS[name] = PeerSpec(
            name=name,
            display=display,
            source=source,
            pretrained=pretrained,
            supervised=cls.supervised,
            gives_maps=cls.gives_maps,
            reference=reference,
            cls=cls,
        )
        return cls

    return deco


def peer_spec(name: str) -> PeerSpec:
    """The registered spec of ``name``, with a clear message for a bad name."""
    key = name.strip().lower()
    if key not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(sorted(PEERS))}")
    return PEERS[key]


def build_peer(name: str, seed: int = 0, device: str = "cpu", **options: Any) -> Peer:
    """A fresh, unfitted peer; ``options`` override the class's model settings."""
    return peer_spec(name).cls(seed=seed, device=device, **options)


def load_peer(directory: str | Path, device: str = "cpu") -> Peer:
    """Read back a peer written by :meth:`Peer.save` (JSON + safetensors, no pickles)."""
    meta = load_meta(Path(directory) / META)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{directory}: unsupported peer format {meta.get('format')!r}")
    peer = build_peer(meta["name"], seed=int(meta["seed"]), device=device, **meta["options"])
    peer._restore(Path(directory), meta)
    return peer


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's, numpy's and Python's global RNGs (libraries draw from them) and restore them afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels (e.g. index accumulation in backward) for the fit, restoring the caller's setting."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch._C._get_deterministic_fill_uninitialized_memory()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch._C._set_deterministic_fill_uninitialized_memory(False)  # NaN-filling every new tensor only costs time
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)
        torch._C._set_deterministic_fill_uninitialized_memory(fill)


class Peer(ABC):
    """One comparison method: ``fit`` on arrays, ``predict`` scores (and maps), ``save``/``load``.

    Subclasses set ``supervised``, ``gives_maps``, ``defaults`` (model settings, overridable by
    keyword) and ``budgets`` (``"quick"`` for tests and smoke runs, ``"default"`` for the 2-core CPU
    profile, ``"paper"`` for the method's published settings on a GPU), and implement
    :meth:`_build` (the modules for one image size), :meth:`_fit` and :meth:`_predict`.
    """

    name: ClassVar[str] = ""
    supervised: ClassVar[bool] = False
    gives_maps: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}
    budgets: ClassVar[dict[str, Budget]] = {}
    # image side must be a multiple of this (backbone strides)
    size_multiple: ClassVar[int] = 16
    # train under torch.use_deterministic_algorithms (slower; for peers whose kernels are otherwise not repeatable)
    deterministic_kernels: ClassVar[bool] = False

    def __init__(self, seed: int = 0, device: str = "cpu", **options: Any) -> None:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown options {sorted(unknown)}; known: {sorted(self.defaults)}")
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.seed = int(seed)
        self.device = torch.device(resolve_device(str(device)))  # as reconstruction.infer.resolve_device
        self.image_size: int | None = None  # side of the data given to fit and predict
        self.work_size: int | None = None  # side the model runs at (Budget.work_size)
        self.net: nn.Module | None = None
        self.record: dict[str, Any] = {}

    # ---- public API -------------------------------------------------------------------------------
    def budget(self, budget: Budget | str = "default") -> Budget:
        """A named budget of this peer (``quick``, ``default``, ``paper``) or a :class:`Budget` as is."""
        if isinstance(budget, Budget):
            return budget
        if budget not in self.budgets:
            raise ValueError(f"{self.name}: unknown budget {budget!r}; choose from {sorted(self.budgets)}")
        return self.budgets[budget]

    def fit(self, train: ScanArrays, val: ScanArrays | None = None, budget: Budget | str = "default") -> dict[str, Any]:
        """Train on ``train`` (normal scans only unless ``supervised``); ``val`` only reports a loss.

        Returns the run's record: budget, steps, losses, whether ImageNet weights were used, seconds.
        """
        b = self.budget(budget)
        images = _images(train, "train")
        if not self.supervised and np.any(np.asarray(train.labels) == DISTENDED):
            raise ValueError(f"{self.name} is unsupervised: train on normal scans only (the caller filters)")
        self.image_size = int(images.shape[-1])
        self.work_size = int(b.work_size or self.image_size)
        if self.work_size > self.image_size:
            raise ValueError(f"{self.name}: work size {self.work_size} exceeds the image side {self.image_size}")
        if self.work_size % self.size_multiple:
            raise ValueError(f"{self.name}: image side {self.work_size} must be a multiple of {self.size_multiple}")
        train, val = resize_arrays(train, self.work_size), None if val is None else resize_arrays(val, self.work_size)
        t0 = time.perf_counter()
        with _seeded(self.seed), _deterministic() if self.deterministic_kernels else nullcontext():
            self.net = self._build(self.work_size).to(self.device)
            rec = self._fit(train, val, b, np.random.default_rng(self.seed))
        self.net.eval()
        self.record = {
            "peer": self.name,
            "budget": b.to_dict(),
            "seed": self.seed,
            "image_size": self.image_size,
            "work_size": self.work_size,
            "pretrained": self.pretrained_used(),
            **rec,
            "train_seconds": round(time.perf_counter() - t0, 3),
        }
        return dict(self.record)

    def predict(self, images: np.ndarray, batch_size: int = 16) -> PeerOutput:
        """Scores ``[N]`` (and maps ``[N, S, S]`` when the method has them) for ``[N, S, S]`` images in [0, 1]."""
        if self.net is None or self.image_size is None or self.work_size is None:
            raise RuntimeError(f"{self.name}: fit or load the peer before predict")
        x = np.asarray(images, dtype=np.float32)
        s_img, s_work = self.image_size, self.work_size
        if x.ndim != 3 or x.shape[1:] != (s_img, s_img):
            raise ValueError(f"{self.name}: expected [N, {s_img}, {s_img}] images, got {x.shape}")
        self.net.eval()
        scores, maps = [], []
        with torch.inference_mode():
            for s in range(0, x.shape[0], batch_size):
                xb = resize_images(torch.from_numpy(x[s : s + batch_size]).unsqueeze(1), s_work).to(self.device)
                sc, mp = self._predict(xb)
                scores.append(sc.reshape(-1).float().cpu().numpy())
                if mp is not None:
                    mp = resize_images(mp.reshape(-1, 1, s_work, s_work).float().cpu(), s_img)
                    maps.append(mp[:, 0].numpy())
        out_maps = np.concatenate(maps).astype(np.float32) if maps else None
        if self.gives_maps and out_maps is None and x.shape[0]:
            raise RuntimeError(f"{self.name}: declared gives_maps but produced no map")
        return PeerOutput(np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32), out_maps)

    def save(self, directory: str | Path) -> Path:
        """Write ``peer.json`` (name, seed, options, image size, record) and ``weights.safetensors``."""
        if self.net is None:
            raise RuntimeError(f"{self.name}: nothing to save before fit")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.net.state_dict().items()}
        save_file(state, str(d / WEIGHTS))
        meta = {
            "format": _FORMAT,
            "name": self.name,
            "seed": self.seed,
            "options": self.options,
            "image_size": self.image_size,
            "work_size": self.work_size,
            "record": self.record,
            "extra": self._extra_state(),
        }
        (d / META).write_text(json.dumps(meta, indent=1, default=_json_default))
        return d

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> Peer:
        """Same as :func:`load_peer`."""
        return load_peer(directory, device)

    def pretrained_used(self) -> bool:
        """Whether this instance starts from ImageNet weights (False: trained from scratch / random init)."""
        return False

    # ---- for subclasses ---------------------------------------------------------------------------
    @abstractmethod
    def _build(self, size: int) -> nn.Module:
        """The method's modules for ``size`` x ``size`` inputs (random init; weights loaded in _fit)."""

    @abstractmethod
    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        """Train ``self.net`` within ``budget``; return record entries (losses, steps)."""

    @abstractmethod
    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x``: ``[B, 1, S, S]`` in [0, 1] -> scores ``[B]`` and maps ``[B, S, S]`` (or None)."""

    def _extra_state(self) -> dict[str, Any]:
        """Plain JSON data a subclass needs back at load (beyond the state dict)."""
        return {}

    def _restore(self, directory: Path, meta: dict[str, Any]) -> None:
        self.image_size = int(meta["image_size"])
        self.work_size = int(meta["work_size"])
        self.record = dict(meta.get("record", {}))
        with _seeded(self.seed):
            net = self._build(self.work_size)
        state = load_file(str(directory / WEIGHTS))
        _resize_buffers(net, state)
        net.load_state_dict(state, strict=True)
        self.net = net.to(self.device).eval()
        self._load_extra(meta.get("extra", {}))

    def _load_extra(self, extra: dict[str, Any]) -> None:
        return None

    def _tensor(self, images: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)


def _images(arrays: ScanArrays, what: str) -> np.ndarray:
    x = np.asarray(arrays.images, dtype=np.float32)
    if x.ndim != 3 or x.shape[1] != x.shape[2] or x.shape[0] == 0:
        raise ValueError(f"{what} images must be a non-empty [N, S, S] array, got {x.shape}")
    return x


def resize_images(x: Tensor, size: int) -> Tensor:
    """``[B, 1, H, W]`` -> ``[B, 1, size, size]`` (antialiased bilinear; identity at the same size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_arrays(arrays: ScanArrays, size: int) -> ScanArrays:
    """``arrays`` at side ``size``: images resized, masks by nearest neighbour, boxes scaled.

    >>> a = ScanArrays(np.ones((1, 8, 8), np.float32), np.float32([[0, 0, 4, 4]]), np.ones((1, 8, 8), bool),
    ...                np.zeros(1, np.int64), np.arange(1), ["p"], np.ones((1, 2), np.float32))
    >>> r = resize_arrays(a, 4)
    >>> r.images.shape, r.boxes.tolist(), bool(r.masks.all())
    ((1, 4, 4), [[0.0, 0.0, 2.0, 2.0]], True)
    """
    side = int(np.asarray(arrays.images).shape[-1])
    if side == size:
        return arrays
    f = size / side
    imgs = resize_images(torch.from_numpy(np.asarray(arrays.images, np.float32)).unsqueeze(1), size)[:, 0].numpy()
    masks = F.interpolate(torch.from_numpy(np.asarray(arrays.masks)).unsqueeze(1).float(), size=(size, size))
    return ScanArrays(
        images=imgs.clip(0, 1).astype(np.float32),
        boxes=(np.asarray(arrays.boxes, np.float32) * f).astype(np.float32),
        masks=masks[:, 0].numpy() > 0.5,
        labels=arrays.labels,
        ids=arrays.ids,
        patients=list(arrays.patients),
        scale=(np.asarray(arrays.scale, np.float32) * f).astype(np.float32),
    )


def _resize_buffers(net: nn.Module, state: dict[str, Tensor]) -> None:
    """Give empty-at-build buffers (memory banks, Gaussian statistics) the saved shapes before loading."""
    for name, buf in list(net.named_buffers()):
        if name in state and buf.shape != state[name].shape:
            owner_name, _, attr = name.rpartition(".")
            owner = net.get_submodule(owner_name) if owner_name else net
            owner._buffers[attr] = torch.empty_like(state[name])


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def batches(n: int, budget: Budget, rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray]]:
    """``(epoch, indices)`` for every training batch of the budget, shuffled by ``rng``.

    >>> b = Budget(epochs=2, batch_size=2, steps_per_epoch=2)
    >>> [(e, len(i)) for e, i in batches(5, b, np.random.default_rng(0))]
    [(0, 2), (0, 2), (1, 2), (1, 2)]
    """
    for epoch in range(budget.epochs):
        order = rng.permutation(n)
        chunks = [order[s : s + budget.batch_size] for s in range(0, n, budget.batch_size)]
        if budget.steps_per_epoch is not None:
            chunks = chunks[: budget.steps_per_epoch]
        for idx in chunks:
            yield epoch, idx


def to_batch(images: np.ndarray, idx: np.ndarray, device: torch.device) -> Tensor:
    """``images[idx]`` (``[N, S, S]`` float32) as a ``[B, 1, S, S]`` tensor on ``device``."""
    return torch.from_numpy(images[idx]).unsqueeze(1).to(device)


def fit_steps(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    n: int,
    budget: Budget,
    rng: np.random.Generator,
    loss_of: Callable[[np.ndarray], Tensor],
    *,
    clip_norm: float = 0.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, Any]:
    """The common training loop: ``net`` in training mode, one ``opt`` step on ``loss_of(indices)`` per batch.

    Batches come from :func:`batches`; ``clip_norm`` (0: off) clips the gradient norm before each step and
    ``scheduler`` steps at the start of every epoch after the first. Returns ``steps`` and the last ``train_loss``.

    >>> net = nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> rec = fit_steps(net, opt, 4, Budget(epochs=2, batch_size=2), np.random.default_rng(0),
    ...                 lambda idx: net(torch.ones(len(idx), 2)).pow(2).mean())
    >>> rec["steps"], rec["train_loss"] >= 0
    (4, True)
    """
    steps, last, epoch_seen = 0, float("nan"), 0
    net.train()
    for epoch, idx in batches(n, budget, rng):
        if scheduler is not None and epoch != epoch_seen:
            scheduler.step()
            epoch_seen = epoch
        loss = loss_of(idx)
        opt.zero_grad()
        loss.backward()
        if clip_norm:
            nn.utils.clip_grad_norm_(net.parameters(), clip_norm)
        opt.step()
        steps += 1
        last = loss.item()
    return {"steps": steps, "train_loss": last}


def gray3(x: Tensor, mean: float = 0.5, std: float = 0.5) -> Tensor:
    """``[B, 1, S, S]`` in [0, 1] -> ``[B, 3, S, S]`` normalised for a 3-channel backbone."""
    return ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()


def mean_loss(fn: Callable[[Tensor], Tensor], images: np.ndarray, device: torch.device, batch_size: int = 16) -> float:
    """Mean of ``fn(batch)`` over ``images`` (a scalar loss per batch, weighted by batch size), no grad."""
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(images[s : s + batch_size]).unsqueeze(1).to(device)
            total += float(fn(x)) * x.shape[0]
            n += x.shape[0]
    return total / max(n, 1)
