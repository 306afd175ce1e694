"""Every ``predict`` setting, with its default written once: :class:`PredictOptions` feeds both the
command line (:meth:`PredictOptions.add_arguments`, :meth:`PredictOptions.from_args`) and
:func:`pipeline.serve.predict.driver.predict_folder`; :class:`ReadOptions` and :class:`Outputs` are
the parts the readers and writers see.

``engine`` is where the frames are processed (``local``: this process; ``ray``: Ray Data actors) and
``backend`` what runs the bundle's graphs (``torch``, or ``onnxruntime`` for an exported bundle). The
Ray engine's actors run the torch bundle, so ``ray`` with ``onnxruntime`` is refused.

>>> parse_frames("all"), parse_frames("3"), parse_frames(None)
('all', 3, None)
>>> parse_shard("1/4")
(1, 4)
>>> o = PredictOptions.from_keywords(batch_size=4, shard="1/2", runtime="onnxruntime")
>>> o.batch_size, o.shard, o.backend, o.prefetch, o.read.max_pixels
(4, (1, 2), 'onnxruntime', 2, 50000000)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from pipeline.cli_args import int_at_least, positive_float, positive_int
from scans.readers import CROP_MODES, CropMode

DEFAULT_MAX_PIXELS = 50_000_000  # per frame; an 8-bit 50 MP image already takes ~1 GB once converted to float
FrameSpec = str | int | None
Shard = tuple[int, int]  # (k, n): the k-th of n parts of a folder
ENGINES = ("local", "ray")  # where the frames are processed
BACKENDS = ("torch", "onnxruntime")  # what runs the bundle's graphs
RUNTIMES = BACKENDS  # the name of before (predict.json keeps calling the backend "runtime")
ENGINE_ALIASES = {"onnxruntime": ("local", "onnxruntime")}  # --engine onnxruntime of before: (engine, backend)


def parse_frames(value: str | int | None) -> FrameSpec:
    """``None`` (the bundle's frame), ``"first"``, ``"all"`` or a frame number >= 0; anything else raises ValueError."""
    if value is None:
        return None
    spec = str(value).strip().lower()
    if spec in ("first", "all"):
        return spec
    try:
        n = int(spec)
    except ValueError:
        raise ValueError(f"frames must be 'first', 'all' or a frame number, not {value!r}") from None
    if n < 0:
        raise ValueError(f"frames: a frame number is 0 or more, not {n}")
    return n


def parse_shard(value: str) -> Shard:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``; anything else raises ValueError."""
    k_text, _, n_text = str(value).strip().partition("/")
    try:
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"shard must be K/N, e.g. 0/4, not {value!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"shard {value}: K/N needs 0 <= K < N")
    return k, n


@dataclass(frozen=True)
class ReadOptions:
    """How ``predict`` reads scans: crop mode, ultrasound region, frames and the pixel limit."""

    crop: CropMode = "regions"
    region: int | None = None
    frames: FrameSpec = None
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Outputs:
    """What ``predict`` writes beside the CSVs: ``overlays/`` PNGs and the DICOM kinds under ``dicom/``."""

    overlays: bool = False
    dicom: tuple[str, ...] = ()

    @property
    def draws(self) -> bool:
        """Whether an overlay is drawn (for ``overlays/``, or the DICOM secondary capture)."""
        return self.overlays or "sc" in self.dicom


@dataclass(frozen=True)
class PredictOptions:
    """Every setting of one ``predict`` run but its bundle, input and output folders.

    ``workers`` None: :func:`pipeline.serve.predict.inputs.default_workers`; ``shard`` None: the whole
    folder; ``actors`` and ``ray_address`` apply to ``engine="ray"`` only.
    """

    batch_size: int = 32  # 9% more images/s than 16 on 2 cores (docs/results.md, "predict at batch 32")
    prefetch: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int | None = None
    engine: str = "local"
    backend: str = "torch"
    actors: int = 1
    ray_address: str | None = None
    crop: CropMode = "regions"
    region: int | None = None
    frames: FrameSpec = None
    overlays: bool = False
    dicom_out: tuple[str, ...] = ()
    review: bool = True
    recursive: bool = False
    device: str = "auto"
    shard: Shard | None = None
    progress: bool = True

    @property
    def read(self) -> ReadOptions:
        return ReadOptions(self.crop, self.region, self.frames, self.max_pixels)

    @property
    def outputs(self) -> Outputs:
        return Outputs(self.overlays, tuple(self.dicom_out))

    def check_engine(self) -> None:
        """Refuse an unknown engine or backend, and a pair that cannot run, with the reason."""
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"runtime must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.engine == "ray" and self.backend != "torch":
            raise ValueError(
                f"--engine ray cannot run --backend {self.backend}: the Ray actors load the torch bundle; "
                f"use --engine local --backend {self.backend}"
            )

    @classmethod
    def from_keywords(
        cls, read: ReadOptions | None = None, runtime: str | None = None, **kwargs: Any
    ) -> PredictOptions:
        """The options of ``predict_folder``'s keyword form: ``read`` (:class:`ReadOptions`), ``runtime`` (the
        backend), ``shard`` as ``(k, n)`` or ``"k/n"``, ``dicom_out`` any sequence; the rest by name."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"predict_folder() got unexpected keyword argument(s) {', '.join(unknown)}")
        if read is not None:
            kwargs |= {"crop": read.crop, "region": read.region, "frames": read.frames, "max_pixels": read.max_pixels}
        if runtime is not None:
            kwargs["backend"] = runtime
        if isinstance(kwargs.get("shard"), str):
            kwargs["shard"] = parse_shard(kwargs["shard"])
        if "dicom_out" in kwargs:
            kwargs["dicom_out"] = tuple(kwargs["dicom_out"])
        return cls(**kwargs)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The ``predict`` options, after ``--model``, ``--input`` and ``--out``; defaults from this class."""
        _read_arguments(parser)
        _output_arguments(parser)
        _run_arguments(parser)
        parser.add_argument("--no-progress", action="store_true")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> PredictOptions:
        """The options that :meth:`add_arguments`' parser gave; ``--engine onnxruntime`` is the local engine
        with the onnxruntime backend."""
        engine, backend = ENGINE_ALIASES.get(ns.engine, (ns.engine, None))
        if backend and ns.backend and ns.backend != backend:
            raise ValueError(f"--engine {ns.engine} runs --backend {backend}, not --backend {ns.backend}")
        return cls(
            batch_size=ns.batch_size,
            prefetch=ns.prefetch,
            max_pixels=int(ns.max_megapixels * 1e6),
            workers=ns.workers,
            engine=engine,
            backend=ns.backend or backend or _DEFAULT.backend,
            actors=ns.actors,
            ray_address=ns.ray_address,
            crop=ns.crop,
            region=ns.region,
            frames=ns.frames,
            overlays=ns.overlays,
            dicom_out=tuple(ns.dicom_out),
            review=not ns.no_review,
            recursive=ns.recursive,
            device=ns.device,
            shard=ns.shard,
            progress=not ns.no_progress,
        )


_DEFAULT = PredictOptions()


def _frames(text: str) -> str | int:
    try:
        value = parse_frames(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert value is not None
    return value


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dicom_kinds(text: str) -> tuple[str, ...]:
    from pipeline.serve.dicom_out import KINDS

    kinds = tuple(dict.fromkeys(k.strip().lower() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(KINDS)}, not {text!r}")
    return kinds


def _read_arguments(pr: argparse.ArgumentParser) -> None:
    """``--recursive`` to ``--max-megapixels``: what is read, on which device, in batches of how many."""
    pr.add_argument("--recursive", action="store_true", help="also process sub-folders")
    pr.add_argument("--batch-size", type=positive_int, default=_DEFAULT.batch_size)
    pr.add_argument("--device", default=_DEFAULT.device)
    pr.add_argument(
        "--crop",
        choices=CROP_MODES,
        default=_DEFAULT.crop,
        help="regions: crop DICOMs to their ultrasound B-mode region when they have one (default); "
        "auto: also find the region from the pixels when they have none; none: never crop",
    )
    pr.add_argument("--region", type=int, help="index into the Sequence of Ultrasound Regions (default: largest)")
    pr.add_argument(
        "--frames",
        type=_frames,
        help="cine DICOMs: first, all (one row per frame) or a frame number (default: the bundle's frame)",
    )
    pr.add_argument(
        "--max-megapixels",
        type=positive_float,
        default=_DEFAULT.max_pixels / 1e6,
        help=f"images with more pixels per frame are refused from their header, before decoding "
        f"(default: {_DEFAULT.max_pixels / 1e6:g})",
    )


def _output_arguments(pr: argparse.ArgumentParser) -> None:
    """``--dicom-out`` to ``--shard``: what is written besides the CSVs, and which share of the folder."""
    pr.add_argument(
        "--dicom-out",
        type=_dicom_kinds,
        nargs="?",
        const=("seg", "sr"),
        default=_DEFAULT.dicom_out,
        metavar="seg,sr,sc",
        help="also write DICOM results of DICOM inputs under OUT/dicom/ (bare flag: seg,sr); "
        "they carry the patient and study tags that file them in a PACS",
    )
    pr.add_argument("--no-review", action="store_true", help="do not write the review page")
    pr.add_argument(
        "--overlays",
        action="store_true",
        help="also write OUT/overlays/<name>.png (scan, heat map, mask contour, box); default: none, the "
        "masks are in predictions.csv's mask_rle column",
    )
    pr.add_argument(
        "--shard",
        type=_shard,
        metavar="K/N",
        help="process only the files whose path hash is K modulo N (e.g. 0/4), each shard into its own "
        "--out; join the folders with `merge`",
    )


def _run_arguments(pr: argparse.ArgumentParser) -> None:
    """``--workers`` to ``--ray-address``: the decoding processes, the engine and the backend."""
    pr.add_argument(
        "--workers",
        type=int_at_least(0),
        help="processes decoding scans while the model runs (local and onnxruntime engines; 0: in this "
        "process; default: 2 with more than 2 cores, else 0)",
    )
    pr.add_argument(
        "--prefetch",
        type=positive_int,
        default=_DEFAULT.prefetch,
        help=f"frames each --workers process reads ahead (default: {_DEFAULT.prefetch})",
    )
    pr.add_argument(
        "--engine",
        choices=[*ENGINES, *ENGINE_ALIASES],
        default=_DEFAULT.engine,
        help="local: this process (default); ray: Ray Data with --actors model-holding actors (needs ray[data]); "
        "onnxruntime: this process, the bundle run by ONNX Runtime",
    )
    pr.add_argument(
        "--backend",
        choices=BACKENDS,
        help="what runs the bundle: torch (default), or onnxruntime (ONNX Runtime, needs loris[export]; "
        "--engine local only, as the Ray actors run torch)",
    )
    pr.add_argument(
        "--actors", type=positive_int, default=_DEFAULT.actors, help="--engine ray: actors, each holding the model"
    )
    pr.add_argument("--ray-address", help="--engine ray: an existing Ray cluster (default: start one on this machine)")
