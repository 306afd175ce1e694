"""The hostile-input corpus: every case of issue 28 ("Hardening, round two") and of the earlier hardening
(issue 18), built here and its outcome asserted, in the default lane.

Each test's node id names the case it covers, ``<issue>.<case>-<what>`` (``28.7-predict-threshold-nan``: issue
28, case 7), so ``pytest tests/integration/test_hostile_corpus.py --collect-only -q`` lists the corpus. Cases of
one shape are rows of one table: command lines refused (:data:`REFUSALS`: exit 2, the file, key or value named,
no traceback, nothing written or deleted), config values (:data:`MEANINGLESS`), damaged checkpoints
(:data:`CHECKPOINTS`). One quick bundle is trained for the module, and the slowest subprocess cases
(:data:`BACKGROUND`) start before the first test, on the second core, while the in-process ones use one thread.

Kept elsewhere: ``train`` with a relative ``--data`` (28.1; tests/integration/test_pipeline_e2e.py),
``aggregate`` refusing runs of another world size (28.17; tests/pipeline/experiment/test_pipeline_aggregate.py),
the network guard in subprocesses (28.19; tests/test_network_guard.py), cache keys over image bytes (18.1;
tests/pipeline/shared/test_pipeline_cache.py).
"""

from __future__ import annotations

import builtins
import copy
import csv
import errno
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from filelock import FileLock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime.io
from pipeline.__main__ import main  # the environment (OMP_WAIT_POLICY) is set by tests/conftest.py
from pipeline.config import ConfigError, load_config
from pipeline.serve.predict import FORMULA_START, PRED_FIELDS, csv_name, csv_rows, decode_mask, decode_name, safe_cell
from pipeline.serve.predict import driver as predict
from scans.__main__ import main as scans_main
from scans.coco import encode_mask
from tests.helpers import make_dataset, train_quick_bundle
from tests.network_guard import guarded_env

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "runtime", "scans", "detectors", "reconstruction", "evaluation", "configs")
# One fold of a tiny phantom; RIAD and figures off: these cases are about inputs, not metrics.
QUICK = [
    *("--profile", "quick", "--no-progress", "--folds", "0"),
    *("--set", "image_size=64", "--set", "folds=2", "--set", "unet.epochs=1", "--set", "threads=1"),
    *("--set", "riad.enabled=false", "--set", "evaluation.figures=false"),
]
PHANTOM = ["phantom.images=32", "phantom.distended=12", "phantom.patients=12", "phantom.size=64"]


def cases(*ids: str) -> pytest.MarkDecorator:
    """The issue cases a test covers, as its parameter ``case``: node ids read ``test_x[28.2-predict-lock]``."""
    return pytest.mark.parametrize("case", ids)


def table(names: str, rows: list[tuple[Any, ...]]) -> pytest.MarkDecorator:
    """A parametrized test's ``rows``: the first value (``case``) names the issue case and is the row's id."""
    return pytest.mark.parametrize(names, rows, ids=[str(r[0]) for r in rows])


# ============================================================================ shared fixtures and helpers


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Path]:
    """One bundle for the module (quick profile, tiny phantom, YOLOv5u without the refiner), one phantom
    scan and a folder of six."""
    bundle, cache = train_quick_bundle(tmp_path_factory)
    pngs = sorted((cache / "phantom").rglob("*.png"))
    folder = bundle.parent / "six"
    folder.mkdir()
    for i, png in enumerate(pngs[:6]):
        cv2.imwrite(str(folder / f"scan{i}.png"), cv2.imread(str(png), cv2.IMREAD_GRAYSCALE))
    scan = cv2.imread(str(pngs[0]), cv2.IMREAD_GRAYSCALE)
    assert scan is not None
    return bundle, scan, folder


@pytest.fixture
def model(trained: tuple[Path, np.ndarray, Path]) -> Path:
    return trained[0]


@pytest.fixture
def scan(trained: tuple[Path, np.ndarray, Path]) -> np.ndarray:
    return trained[1]


@pytest.fixture(scope="module")
def finished(trained: tuple[Path, np.ndarray, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An input folder of two scans and the folder of a finished ``predict`` of it (copy it to change it)."""
    root = tmp_path_factory.mktemp("finished")
    folder = _scans(root / "in", trained[1])
    assert _predict(trained[0], folder, root / "out") == 0
    return folder, root / "out"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scans.phantom import generate_dataset

    root = tmp_path_factory.mktemp("phantom") / "data"
    return generate_dataset(root, n_images=32, n_distended=12, n_patients=12, size=64, seed=0, progress=False)


def _scans(folder: Path, scan: np.ndarray, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"s{i}.png"), np.roll(scan, 3 * i, axis=1))
    return folder


def _predict(model: Path, folder: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--model", str(model), "--input", str(folder), "--out", str(out), "--no-progress", *extra])


def _run(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["run", "--data", str(data), "--out", str(out), *QUICK, "--set", f"cache_dir={cache / 'models'}", *extra]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (and its bytes) and its folders, the lock file left out."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files.pop(".lock", None)
    return files | {"(dirs)": "\n".join(sorted(p.name for p in folder.rglob("*") if p.is_dir())).encode()}


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train`` and ``run`` fail the test, at once, if they get as far as loading data."""
    from pipeline.experiment import run
    from pipeline.serve import train

    def no_data(cfg: Any) -> Any:
        raise AssertionError("data loaded: the command was not refused before it started")

    monkeypatch.setattr(train, "load_data", no_data)
    monkeypatch.setattr(run, "load_data", no_data)


def _bundle_json(root: Path, **changes: Any) -> Path:
    """A bundle folder holding only a valid ``bundle.json`` (then ``changes``, dotted keys)."""
    from detectors.prior import PriorPolicy
    from pipeline.serve.train import Thresholds, bundle_doc

    cfg = load_config(None, "quick", ["image_size=64"])
    doc = bundle_doc(cfg, PriorPolicy(0.05, (8.0, 16.0, 56.0, 32.0)), Thresholds(0.2, {}, 0.1, 0.5))
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = doc
        for p in parents:
            node = node[p]
        node[last] = value
    root.mkdir(parents=True)
    (root / "bundle.json").write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them
    return root


# ============================================================================ subprocess cases, started first


@dataclass
class Job:
    """A subprocess case running in the background: its process, its output files and what it checks after."""

    proc: subprocess.Popen[bytes]
    where: Path
    ctx: dict[str, Any] = field(default_factory=dict)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        return rc, (self.where / "stdout").read_text(), (self.where / "stderr").read_text()


def _spawn(where: Path, cmd: list[str], **kwargs: Any) -> Job:
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "stdout", "wb") as out, open(where / "stderr", "wb") as err:  # files: a pipe could fill
        return Job(subprocess.Popen(cmd, stdout=out, stderr=err, **kwargs), where)


# PatchCore's coreset (28.16): anomalib 2.7's KCenterGreedy allocated a fresh n x k float32 difference at every
# greedy step; for these banks (29.9 MB, just under glibc's 32 MiB mmap ceiling) it came from the brk heap, small
# allocations between steps split each freed block, and the heap grew by one block per step until the kernel killed
# the run. The peer's own k_center_greedy (same picks) works in buffers allocated once.
N_PATCHES, N_FEATURES = 29440, 152  # fold 0 of the 240-image phantom: 115 scans x 16 x 16 patches, 40 + 112 channels
PER_BATCH = 8 * 256  # the peer's default batch of 8 scans at 128 px: one stored embedding per batch
RATIO = 0.02  # 588 greedy steps: the old sampler's growth shows within ~100; the default 0.1 only takes longer
PROJECTED = 254  # anomalib's Johnson-Lindenstrauss dimension for 29440 samples at eps 0.9
# the bank's copy (17 MiB) and its projection (28.5 MiB), each allocated once, a 4 MiB difference chunk and room
# for the allocator; anomalib's sampler also holds a full n x k difference (28.5 MiB) and, its freed blocks
# unusable, grew by 120 MiB (in this test) to gigabytes (in the failing runs)
GROWTH_BOUND_MIB = N_PATCHES * (N_FEATURES + PROJECTED) * 4 / 2**20 + 16
HEADROOM = 2_000_000_000  # the child's address space beyond what it holds before the step: fail fast, not swap

CORESET_CHILD = textwrap.dedent(
    """
    import json, resource, sys, threading, time, warnings
    warnings.simplefilter("ignore")
    import numpy as np, torch
    from reconstruction.peers import build_peer

    bank_file, ratio = sys.argv[1], float(sys.argv[3])
    per_batch, headroom, seed = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    peer = build_peer("patchcore", coreset_ratio=ratio)
    peer.net = peer._build(128)
    bank = torch.load(bank_file)
    peer.net.embedding_store.extend(bank.split(per_batch))  # as the peer's fit stores it, batch by batch
    del bank
    cap = status("VmSize") + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    base, peak, done = status("VmRSS"), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], status("VmRSS"))
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    torch.manual_seed(seed)
    np.random.seed(seed)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            record, error = peer._fit_bank(), None
    except (MemoryError, RuntimeError) as e:
        record, error = None, str(e)[:200]
    done.set()
    peak[0] = max(peak[0], status("VmRSS"))
    print(json.dumps({"growth_mib": (peak[0] - base) / 2**20, "seconds": time.perf_counter() - t0,
                      "record": record, "error": error}))
    """
)


def _start_coreset(root: Path, seed: int) -> Job:
    """PatchCore's bank step in a child (its own heap, an address-space cap, one torch thread) on a bank of
    the failing shape; two seeds, since the old sampler's heap depended on the random projection drawn."""
    bank = root / "bank.pt"
    if not bank.is_file():
        torch.save(torch.randn(N_PATCHES, N_FEATURES, generator=torch.Generator().manual_seed(0)), bank)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-c", CORESET_CHILD, str(bank), str(PER_BATCH), str(RATIO), str(HEADROOM), str(seed)]
    return _spawn(root / f"coreset-{seed}", cmd, cwd=ROOT, env=env)


def _start_fresh_run(root: Path) -> Job:
    """``run`` from a copy of the code, with a fresh HOME, TMPDIR, cache and working folder."""
    code = root / "code"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    home, tmp, cache, cwd = (root / n for n in ("home", "tmp", "cache", "cwd"))
    for d in (home, tmp, cwd):
        d.mkdir()
    keep = ("PATH", "LANG", "LC_ALL", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "LORIS_CACHE": str(cache), "PYTHONPATH": str(code)}
    env |= {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONSAFEPATH": "1"}  # no bytecode beside the code
    env = guarded_env(env)
    cmd = [sys.executable, "-m", "pipeline", "run", "--out", str(root / "out"), *QUICK]
    cmd += [a for s in [*PHANTOM, f"cache_dir={cache / 'models'}"] for a in ("--set", s)]
    job = _spawn(root / "log", cmd, cwd=cwd, env=env)
    job.ctx = {"code": code, "before": _files(code), "env": env, "dirs": (home, tmp, cwd), "out": root / "out"}
    return job


def _start_cache_file(root: Path) -> Job:
    """``train`` in a fresh process under a ``LORIS_CACHE`` that is a file (torch would fail on import)."""
    root.mkdir(parents=True)
    blocker = root / "cache-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "LORIS_CACHE": str(blocker)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    job = _spawn(root / "log", [sys.executable, "-m", "pipeline", "train", "--out", str(root / "m")], cwd=ROOT, env=env)
    job.ctx = {"blocker": blocker, "out": root / "m"}
    return job


def _start_ckpt_message(root: Path) -> Job:
    """What a user sees of a damaged checkpoint, in a fresh process."""
    root.mkdir(parents=True)
    path = root / "weights.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    code = f"from runtime.io import load_state\nload_state({str(path)!r})"
    job = _spawn(root / "log", [sys.executable, "-c", code], cwd=ROOT)
    job.ctx = {"path": path}
    return job


BACKGROUND: dict[str, Callable[[Path], Job]] = {
    "28.16-coreset-memory-seed-1": lambda root: _start_coreset(root, 1),
    "28.16-coreset-memory-seed-2": lambda root: _start_coreset(root, 2),
    "18.5-writes-only-out-and-cache": lambda root: _start_fresh_run(root / "fresh"),
    "28.14-cache-is-a-file-at-start-up": lambda root: _start_cache_file(root / "cache-file"),
    "18.3-checkpoint-message-no-traceback": lambda root: _start_ckpt_message(root / "ckpt"),
}


@pytest.fixture(scope="module", autouse=True)
def background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Job]]:
    """The :data:`BACKGROUND` cases selected in this session, started before the module's first test."""
    here = sys.modules[__name__]
    chosen = {
        item.callspec.params.get("case")
        for item in request.session.items
        if getattr(item, "module", None) is here and hasattr(item, "callspec")
    }
    root = tmp_path_factory.mktemp("background")
    jobs = {case: start(root) for case, start in BACKGROUND.items() if case in chosen}
    yield jobs
    for job in jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


# ============================================================================ command lines refused (one table)


@dataclass(frozen=True)
class Ctx:
    """What a refusal's builder may use: its own folder, the module's phantom, the cache, monkeypatch, fixtures."""

    tmp: Path
    phantom: Path
    cache: Path
    mp: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    @property
    def model(self) -> Path:
        """The module's trained bundle (trained on first use)."""
        return Path(self.request.getfixturevalue("trained")[0])


@dataclass(frozen=True)
class Refusal:
    """A command line that exits 2 with ``says`` on stderr (``{tmp}``: the case's folder, ``{LORIS_CACHE}``:
    that variable), no traceback, its folder as it was and no model or phantom in the cache."""

    build: Callable[[Ctx], list[str]]  # writes the case's files under ctx.tmp; the argv ("scans" first: scans CLI)
    says: tuple[str, ...]
    loads_data: bool = False  # refused by the data checks, after the data is read (else reading it fails the test)
    alone: bool = False  # stderr is one line, starting with "error:"


def _tampered(command: str, changes: dict[str, Any]) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        model = _bundle_json(ctx.tmp / "model", **changes)
        if command == "export":
            return ["export", "--model", str(model), "--out", str(ctx.tmp / "out")]
        (ctx.tmp / "in").mkdir()
        cv2.imwrite(str(ctx.tmp / "in" / "a.png"), np.zeros((32, 32), np.uint8))
        return ["predict", "--model", str(model), "--input", str(ctx.tmp / "in"), "--out", str(ctx.tmp / "out")]

    return build


TAMPERED: dict[str, tuple[dict[str, Any], str]] = {
    "threshold-nan": ({"score.threshold": math.nan}, "score.threshold is nan"),
    "threshold-inf": ({"score.threshold": math.inf}, "score.threshold is inf"),
    "segmentation-threshold-nan": ({"segmentation.threshold": math.nan}, "segmentation.threshold is nan"),
    "image-size-minus-5": ({"image_size": -5}, "image_size is -5"),
    "image-size-100000": ({"image_size": 100000}, "image_size is 100000"),
    "unknown-map": ({"maps": ["bogusmap", "dd"], "score.map": "bogusmap"}, "maps is 'bogusmap'"),
    "score-map-not-computed": ({"score.map": "ssim"}, "score.map is 'ssim'"),
    "bad-prior-box": ({"prior.median_box": [1, 2, 3]}, "prior.median_box is [1, 2, 3]"),
}


def _into(kind: str) -> Callable[[Ctx], list[str]]:
    """``train`` into a run folder or into a file."""

    def build(ctx: Ctx) -> list[str]:
        out = ctx.tmp / kind
        if kind == "run":
            out.mkdir()
            (out / "config.yaml").write_text("seed: 0\n")
        else:
            out.write_text("precious")
        return ["train", "--detector", "yolov5", "--out", str(out), "--profile", "quick"]

    return build


def _run_out_is_a_file(ctx: Ctx) -> list[str]:
    (ctx.tmp / "out").write_text("precious")
    return _run(ctx.phantom, ctx.tmp / "out", ctx.cache)


def _unwritable_cache(kind: str) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        if kind == "below-a-file":
            (ctx.tmp / "file").write_text("x")
            where = ctx.tmp / "file" / "below-a-file"
        elif os.geteuid() != 0:
            where = ctx.tmp / "locked"
            where.mkdir(mode=0o500)
        else:  # root writes into any folder, but not into /proc
            where = Path("/proc/loris-cache")
        ctx.mp.setenv("LORIS_CACHE", str(where))
        return ["run", "--profile", "quick", "--out", str(ctx.tmp / "run")]

    return build


def _nested_out(where: str) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        folder = ctx.tmp / "data" / "in"
        folder.mkdir(parents=True)
        cv2.imwrite(str(folder / "a.png"), np.zeros((32, 32), np.uint8))
        out = {"same": folder, "inside": folder / "results", "around": ctx.tmp / "data"}[where]
        return ["predict", "--model", str(_bundle_json(ctx.tmp / "m")), "--input", str(folder), "--out", str(out)]

    return build


def _bad_option(flag: str, value: str) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        where = str(ctx.tmp)
        return ["predict", "--model", where, "--input", where, "--out", f"{where}/o", flag, value]

    return build


def _truncated(part: str) -> Callable[[Ctx], list[str]]:
    """The trained bundle with one weights file cut to 1000 bytes."""

    def build(ctx: Ctx) -> list[str]:
        bad = shutil.copytree(ctx.model, ctx.tmp / "model")
        target = bad / part
        target.write_bytes(target.read_bytes()[:1000])
        (ctx.tmp / "in").mkdir()
        cv2.imwrite(str(ctx.tmp / "in" / "a.png"), np.zeros((32, 32), np.uint8))
        return ["predict", "--model", str(bad), "--input", str(ctx.tmp / "in"), "--out", str(ctx.tmp / "out")]

    return build


def _edit(key: str, change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        change(doc[key][0] if key == "annotations" else doc["images"][0])

    return edit


def _set(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda entry: entry.__setitem__(name, value)


def _bbox(i: int, value: float) -> Callable[[dict[str, Any]], None]:
    return lambda ann: ann["bbox"].__setitem__(i, value)


def _duplicate_id(doc: dict[str, Any]) -> None:
    doc["images"][1]["id"] = doc["images"][0]["id"]


BAD_DATA: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "negative-box": (_edit("annotations", _bbox(0, -5.0)), "lies outside"),
    "zero-size-box": (_edit("annotations", _bbox(2, 0.0)), "has no area"),
    "out-of-image-box": (_edit("annotations", _bbox(0, 60.0)), "lies outside the 64x64 image"),
    "nan-box": (_edit("annotations", _bbox(1, float("nan"))), "non-finite"),
    "duplicate-image-id": (_duplicate_id, "duplicate image id"),
    "string-boolean": (_edit("images", _set("distended", "false")), "not a JSON boolean"),
    "file-name-escaping": (_edit("images", _set("file_name", "../../outside/x.png")), "outside the dataset folder"),
    "absolute-file-name": (_edit("images", _set("file_name", "/etc/hostname")), "is absolute"),
    "not-an-object": (lambda doc: doc.clear(), "must be a JSON object"),
}


def _bad_data(case: str, external: bool) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        bad = shutil.copytree(ctx.phantom, ctx.tmp / "bad")
        doc = json.loads((bad / "annotations.json").read_text())
        BAD_DATA[case][0](doc)
        (bad / "annotations.json").write_text(json.dumps([] if case == "not-an-object" else doc))
        if external:  # a held-out set is checked like the training data
            return _run(ctx.phantom, ctx.tmp / "out", ctx.cache, "--external", str(bad))
        return _run(bad, ctx.tmp / "out", ctx.cache)

    return build


def _phantom(options: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["scans", "phantom", "--out", str(ctx.tmp / "ph"), *options.split()]


PHANTOM_BAD = {
    "--images 0": "n_images (--images) must be 6 or more",
    "--patients 0": "n_patients (--patients) must be in [6, 483]",
    "--images 12 --patients 6 --distended 13": "n_distended (--distended) must be in [0, 12]",
    "--size 7": "size (--size) must be in [32, 2048] pixels, got 7",
    "--size 100000": "size (--size) must be in [32, 2048] pixels, got 100000",
    "--seed -1": "seed (--seed) must be in [0, 4294967295]",
}
CACHE_SAYS = ("LoRIS cache {LORIS_CACHE} (from $LORIS_CACHE) is not a writable folder",)

REFUSALS: dict[str, Refusal] = {
    "28.3-train-into-a-run-folder": Refusal(_into("run"), ("is a LoRIS run folder",)),
    "28.3-train-into-a-file": Refusal(_into("file"), ("is an existing file",)),
    **{
        f"28.7-{cmd}-{name}": Refusal(_tampered(cmd, changes), ("{tmp}/model/bundle.json", says))
        for cmd in ("predict", "export")
        for name, (changes, says) in TAMPERED.items()
    },
    "28.8-run-maps-empty": Refusal(
        lambda ctx: ["run", "--profile", "quick", "--out", str(ctx.tmp / "run"), "--set", "maps=[]", "--no-progress"],
        ("maps: name at least one anomaly map",),
    ),
    "28.14-cache-below-a-file": Refusal(_unwritable_cache("below-a-file"), CACHE_SAYS),
    "28.14-cache-not-writable": Refusal(_unwritable_cache("locked"), CACHE_SAYS),
    **{
        f"28.15-phantom-{opts.replace(' --', '-').lstrip('-').replace(' ', '-')}": Refusal(_phantom(opts), (says,))
        for opts, says in PHANTOM_BAD.items()
    },
    **{
        f"18.2-{name}-{'external' if ext else 'data'}": Refusal(
            _bad_data(name, ext), (reason, "nothing was trained"), loads_data=True
        )
        for name, (_, reason) in BAD_DATA.items()
        for ext in (False, True)
    },
    "18.3-run-out-is-a-file": Refusal(_run_out_is_a_file, ("is an existing file",)),
    "18.3-truncated-unet-weights": Refusal(_truncated("unet/model.pt"), ("{tmp}/model/unet/model.pt",)),
    "18.3-truncated-detector-weights": Refusal(_truncated("detector/weights.pt"), ("{tmp}/model/detector/weights.pt",)),
    **{
        f"18.4-out-{w}-input": Refusal(_nested_out(w), ("error: --out",), alone=True)
        for w in ("same", "inside", "around")
    },
    **{
        f"18.4-option{flag}={value}": Refusal(_bad_option(flag, value), (flag,))
        for flag, value in (
            ("--batch-size", "-1"),
            ("--batch-size", "0"),
            ("--frames", "-2"),
            ("--max-megapixels", "0"),
        )
    },
}


def _exit_code(argv: list[str]) -> int:
    try:
        return scans_main(argv[1:]) if argv[0] == "scans" else main(argv)
    except SystemExit as exc:  # the option parser's own refusals
        return int(exc.code or 0)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_naming_the_cause_with_nothing_written(
    case: str,
    tmp_path: Path,
    phantom: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    import scans.phantom

    rule = REFUSALS[case]
    ctx = Ctx(tmp_path / "case", phantom, cache, monkeypatch, request)
    ctx.tmp.mkdir()
    argv = rule.build(ctx)  # before the guards below: it may train the module's bundle

    def no_render(*a: Any, **k: Any) -> Any:
        raise AssertionError("rendered a phantom with options it should have refused")

    monkeypatch.setattr(scans.phantom, "render_scan", no_render)
    if not rule.loads_data:
        _no_data(monkeypatch)
    before = _snapshot(ctx.tmp)
    code = _exit_code(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for text in rule.says:
        text = text.replace("{tmp}", str(ctx.tmp)).replace("{LORIS_CACHE}", os.environ["LORIS_CACHE"])
        assert text in err, (text, err)
    if rule.alone:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert _snapshot(ctx.tmp) == before  # nothing written, nothing deleted
    assert not (cache / "models").exists() and not (cache / "phantom").exists()


# ============================================================================ config values (28.8)

MEANINGLESS = {
    "unet.lr=.inf": "unet.lr: expected a finite number >= 0, got inf",
    "unet.lr=.nan": "unet.lr: expected a finite number >= 0, got nan",
    "detector.expand_side=.inf": "detector.expand_side: expected a finite number",
    "unet.loss_weights=[0,0,0]": "unet.loss_weights: the MSGMS, SSIM and L2 weights must be >= 0 with a positive sum",
    "unet.loss_weights=[1,-1,1]": "unet.loss_weights",
    "maps=[]": "maps: name at least one anomaly map (known: msgmsd",
    "maps=[dd,dd]": "maps: 'dd' is listed more than once",
    "maps=[bogusmap]": "maps: unknown anomaly map 'bogusmap'; known: msgmsd",
    "bundle.score_map=bogusmap": "bundle.score_map: unknown anomaly map 'bogusmap'",
    "riad.ks=[0]": "riad.ks: grid cell sizes must be 1 or more, got 0",
    "riad.ks=[]": "riad.ks: name at least one grid cell size",
    "image_size=100000": "image_size: expected an int in [16, 2048], got 100000",
    "image_size=8": "image_size: expected an int in [16, 2048], got 8",
    "seed=99999999999999999999": "seed: expected an int in [0, 4294967295], got 99999999999999999999",
    "phantom.size=100000": "phantom.size: expected an int in [32, 2048]",
    "phantom.patients=3": "phantom.patients: expected an int in [6, phantom.images",
    "unet.epoch=5": "--set unet.epoch=5: unknown key 'unet.epoch'; did you mean 'unet.epochs'?",
}


@table("case, override", [(f"28.8-{o}", o) for o in MEANINGLESS])
def test_config_values_that_mean_nothing_are_refused_naming_the_key(case: str, override: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, "quick", [override])
    assert MEANINGLESS[override] in str(exc.value)


@cases("28.8-threads-over-cores-warned")
def test_more_threads_than_cores_is_warned_not_refused(
    case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert load_config(None, "quick", ["threads=999"]).threads == 999
    assert "warning: threads=999 is more than this machine's 2 CPU core(s)" in capsys.readouterr().err
    load_config(None, "quick", ["threads=2"])
    assert "warning" not in capsys.readouterr().err


# ============================================================================ locks (28.2, 28.3, 18.6)


@cases("28.2-predict-merge-export-lock")
def test_a_second_process_on_one_out_is_refused_and_writes_nothing(
    case: str,
    model: Path,
    scan: np.ndarray,
    finished: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, out = shutil.copytree(finished[0], tmp_path / "in"), shutil.copytree(finished[1], tmp_path / "out")
    cv2.imwrite(str(folder / "new.png"), scan)  # more work for the second call, were it let in
    before = _snapshot(out)
    holder = FileLock(str(out / ".lock"))  # what a running predict holds (flock: other processes see it too)
    holder.acquire(timeout=0)
    try:
        assert _predict(model, folder, out) == 2
        line = _one_line_error(capsys)
        assert str(out) in line and "in use by another LoRIS process" in line
        assert _snapshot(out) == before
        # merge into it, and export into it, are refused the same way
        assert main(["merge", str(out), "--out", str(out.parent / "merged")]) == 2  # the shard is being written
        assert "being written by a running predict" in _one_line_error(capsys)
        assert not (tmp_path / "merged").exists()
        assert main(["export", "--model", str(model), "--out", str(out), "--no-detector"]) == 2
        assert "in use by another LoRIS process" in _one_line_error(capsys)
        assert _snapshot(out) == before
    finally:
        holder.release()
    # a first run that has only just taken a new folder: the second leaves nothing in it
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    holder = FileLock(str(fresh / ".lock"))
    holder.acquire(timeout=0)
    try:
        assert _predict(model, folder, fresh) == 2
        assert "in use" in _one_line_error(capsys)
        assert sorted(p.name for p in fresh.iterdir()) == [".lock"]
    finally:
        holder.release()
    # once the lock is free the rerun resumes: only the new scan is processed
    assert _predict(model, folder, out) == 0
    assert sorted(r["file"] for r in _rows(out / "predictions.csv")) == ["new.png", "s0.png", "s1.png"]


def _holder(code: str) -> subprocess.Popen[str]:
    """A process that takes a lock (``code``), says "held" and keeps it for a minute."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@cases("28.3-train-lock")
def test_a_second_train_into_a_locked_bundle_folder_refuses_and_leaves_it_alone(
    case: str, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model"
    (out / "work" / "detector").mkdir(parents=True)
    (out / "work" / "detector" / "log.txt").write_text("the first train's work")
    _no_data(monkeypatch)
    holder = _holder(  # the first `train`, holding the folder's lock as it trains
        "import os, time; from filelock import FileLock\n"  # the lock run_lock takes, PID inside
        f"lock = FileLock({str(out / '.lock')!r}); lock.acquire(timeout=0)\n"
        f"open({str(out / '.lock')!r}, 'w').write(f'{{os.getpid()}}\\n')\n"
        "print('held', flush=True); time.sleep(60)",
    )
    try:
        before = _files(out)
        code = main(["train", "--detector", "yolov5", "--out", str(out), "--profile", "quick", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and f"in use by another LoRIS process (PID {holder.pid})" in err, err
        assert "Traceback" not in err and _files(out) == before  # nothing deleted, nothing added
        assert (out / "work" / "detector" / "log.txt").read_text() == "the first train's work"
    finally:
        holder.kill()
        holder.wait()
    assert not (cache / "models").exists() and not (cache / "phantom").exists()


@cases("18.6-run-lock")
def test_a_second_run_into_a_locked_folder_refuses_naming_the_holder(
    case: str, tmp_path: Path, phantom: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    holder = _holder(
        "import sys, time; from pathlib import Path; from pipeline.run_dirs import run_lock\n"
        f"with run_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"
    )
    try:
        assert main(_run(phantom, out, cache)) == 2
        assert f"in use by another LoRIS process (PID {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "config.yaml").exists()  # the refused run wrote nothing


# ============================================================================ file names and CSV cells (28.4, 28.13)

HOSTILE_NAMES = [
    b"bad\xff\xfe.png",  # not UTF-8
    b"=cmd.png",
    b"+sum.png",
    b"-minus.png",
    b"@at.png",
    b"\ttab.png",
    b"\rcr.png",
    b"'quoted.png",  # already starts with the guard's quote
    b"back\\slash.png",
    b"back\\xffnot-a-byte.png",  # the escape's own spelling, as a plain name
    b"caf\xc3\xa9.png",  # UTF-8, not ASCII: written as it is
]


def _unsafe(cell: str) -> bool:
    """A cell a spreadsheet would run as a formula (a number, such as a negative score, is data)."""
    try:
        float(cell)
    except ValueError:
        return cell.startswith(FORMULA_START)
    return False


@cases("28.4+13-hostile-names")
def test_hostile_names_are_processed_escaped_and_resumed(
    case: str, model: Path, scan: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _scans(tmp_path / "in", scan, n=1)
    raw = bytes(folder)
    for name in HOSTILE_NAMES:
        shutil.copyfile(raw + b"/s0.png", raw + b"/" + name)
    shutil.copyfile(raw + b"/s0.png", raw + b"/=HYPERLINK(x)\xff.txt")  # refused: unsupported type
    out = tmp_path / "out"
    assert _predict(model, folder, out, "--overlays", "--batch-size", "3") == 0
    preds, errors = _rows(out / "predictions.csv"), _rows(out / "errors.csv")
    # every scan has its row, and its name comes back, byte for byte
    assert sorted(os.fsencode(decode_name(r["file"])) for r in preds) == sorted([*HOSTILE_NAMES, b"s0.png"])
    assert [os.fsencode(decode_name(e["file"])) for e in errors] == [b"=HYPERLINK(x)\xff.txt"]
    assert "unsupported" in errors[0]["reason"]
    cells = {os.fsencode(decode_name(r["file"])): r["file"] for r in preds}
    assert cells[b"bad\xff\xfe.png"] == "bad\\xff\\xfe.png" and cells[b"=cmd.png"] == "'=cmd.png"
    assert cells[b"'quoted.png"] == "''quoted.png" and cells[b"back\\slash.png"] == "back\\\\slash.png"
    assert cells[b"caf\xc3\xa9.png"] == "café.png" and len(set(cells.values())) == len(cells)
    # no cell of either CSV runs as a formula
    for row in preds + errors:
        assert not any(_unsafe(v) for v in row.values()), row
    # every row has its overlay and every overlay its row; masks decode
    overlays = {p.relative_to(out).as_posix() for p in (out / "overlays").iterdir()}
    assert overlays == {r["overlay"] for r in preds} and len(overlays) == len(preds)
    assert all(decode_mask(r).shape == scan.shape for r in preds)
    assert (out / "index.html").is_file()
    # a rerun finds everything done: no row twice
    capsys.readouterr()
    assert _predict(model, folder, out, "--overlays") == 0
    assert "0 image(s)" in capsys.readouterr().err
    assert len(_rows(out / "predictions.csv")) == len(preds) and len(_rows(out / "errors.csv")) == 1


_NAME_BYTES = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b)


@cases("28.4+13-names-round-trip")
@settings(max_examples=300, deadline=None)
@given(a=_NAME_BYTES, b=_NAME_BYTES)
def test_names_round_trip_and_never_share_a_cell(case: str, a: bytes, b: bytes) -> None:
    ca, cb = csv_name(os.fsdecode(a)), csv_name(os.fsdecode(b))
    assert os.fsencode(decode_name(ca)) == a
    assert (ca == cb) == (a == b)
    assert not ca.startswith(FORMULA_START)
    ca.encode("utf-8")  # always writable


@cases("28.13-cells-from-scans")
def test_cells_from_scans_are_neutralised_and_masks_still_decode(case: str) -> None:
    assert safe_cell("=1.2.840") == "'=1.2.840" and safe_cell("1.2.840") == "1.2.840"  # a DICOM's UID
    assert safe_cell(os.fsdecode(b"x\xff")) == "x\\udcff"  # a reason quoting a name: still writable
    mask = np.zeros((20, 4), bool)
    mask[13:, 0] = True  # a first run of 13 background pixels: COCO RLE starts with "="
    counts = encode_mask(mask)["counts"]
    assert counts.startswith("=")
    row = {"mask_rle": safe_cell(counts), "width": "4", "height": "20"}
    assert row["mask_rle"] == "'" + counts
    np.testing.assert_array_equal(decode_mask(row), mask)


# ============================================================================ batches that go on (18.4, 28.5)


@cases("18.4-links-loops-fifo-huge")
def test_hostile_files_are_listed_and_the_batch_goes_on(
    case: str, model: Path, scan: np.ndarray, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), scan)
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    os.symlink("missing.png", folder / "dangling.png")
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    (folder / "truncated.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    big = np.zeros((8000, 8000), np.uint8)
    cv2.imwrite(str(folder / "huge.png"), big)
    del big
    out = tmp_path / "out"
    assert _predict(model, folder, out, "--batch-size", "2") == 0
    assert [r["file"] for r in _rows(out / "predictions.csv")] == ["good.png"]
    reasons = {e["file"]: e["reason"] for e in _rows(out / "errors.csv")}
    assert set(reasons) == {"a.png", "b.png", "dangling.png", "pipe.png", "truncated.dcm", "huge.png"}
    assert "loop" in reasons["a.png"] and "broken" in reasons["dangling.png"] and "regular" in reasons["pipe.png"]
    assert "8000x8000" in reasons["huge.png"] and "megapixels" in reasons["huge.png"]
    # a rerun finds everything done; a raised pixel limit is not retried (delete the error row to retry)
    assert _predict(model, folder, out, "--max-megapixels", "100") == 0
    assert len(_rows(out / "predictions.csv")) == 1 and len(_rows(out / "errors.csv")) == 6
    assert len(list(out.glob("*.html"))) == 1


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@cases("28.5-kill-9-ends-workers")
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_kill_9_of_predict_ends_its_decoding_workers(case: str, model: Path, scan: np.ndarray, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    big = cv2.resize(scan, (384, 384))
    for i in range(150):
        cv2.imwrite(str(folder / f"s{i:03d}.png"), np.roll(big, i, axis=1))
    out = tmp_path / "out"
    env = {**os.environ, "LORIS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["--model", str(model), "--input", str(folder), "--out", str(out), "--workers", "2", "--batch-size", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "predict", *args, "--no-progress", "--no-review"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            rows = (out / "predictions.csv").read_bytes().count(b"\n") if (out / "predictions.csv").exists() else 0
            if len(workers) >= 2 and rows >= 2:  # mid-run: workers decoding, rows written
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) >= 2, "predict ended before it could be killed mid-run"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "decoding workers outlived their killed parent"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ============================================================================ resumes and merges (28.6)


def _no_manifest(out: Path) -> None:
    (out / "predict.json").unlink()  # the other-bundle check cannot be bypassed


def _csv_not_text(out: Path) -> None:
    data = (out / "predictions.csv").read_bytes()
    cut = data.index(b"s1.png")
    (out / "predictions.csv").write_bytes(data[:cut] + b"\xff" + data[cut:])  # byte 0xff in a row


def _bad_manifest(out: Path) -> None:
    (out / "predict.json").write_bytes(b"\xff{")


# (case, how the finished folder is changed, the rerun's options, what its one error line says; {out}: the folder)
RESUMES: list[tuple[str, Callable[[Path], Any] | None, list[str], tuple[str, ...]]] = [
    ("28.6-resume-crop-auto", None, ["--crop", "auto"], ("begun with --crop regions and this run has --crop auto",)),
    ("28.6-resume-overlays", None, ["--overlays"], ("begun with no --overlays and this run has --overlays",)),
    ("28.6-resume-frames-all", None, ["--frames", "all"], ("begun with no --frames and this run has --frames all",)),
    (
        "28.6-resume-dicom-out",
        None,
        ["--dicom-out", "seg"],
        ("begun with no --dicom-out and this run has --dicom-out seg",),
    ),
    ("28.6-no-manifest", _no_manifest, [], ("holds predictions.csv and errors.csv but no predict.json",)),
    ("28.6-csv-not-text", _csv_not_text, [], ("{out}/predictions.csv is not a LoRIS predictions.csv", "0xff")),
    ("28.6-manifest-damaged", _bad_manifest, [], ("{out}/predict.json is not a LoRIS predict.json",)),
]


@table("case, change, extra, says", RESUMES)
def test_a_resume_that_would_misdescribe_the_folder_is_refused(
    case: str,
    change: Callable[[Path], Any] | None,
    extra: list[str],
    says: tuple[str, ...],
    model: Path,
    finished: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, out = finished[0], shutil.copytree(finished[1], tmp_path / "out")
    if change is not None:
        change(out)
    before = _snapshot(out)
    assert _predict(model, folder, out, *extra) == 2
    line = _one_line_error(capsys)  # one line, no traceback
    assert str(out) in line and all(s.replace("{out}", str(out)) in line for s in says), line
    assert _snapshot(out) == before and not (out / "overlays").exists()  # left as it was


@cases("28.6-merge-other-settings")
def test_merge_refuses_shards_made_with_other_settings(
    case: str, model: Path, scan: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _scans(tmp_path / "in", scan, n=4)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _predict(model, folder, a, "--shard", "0/2", "--no-review") == 0
    assert _predict(model, folder, b, "--shard", "1/2", "--no-review", "--crop", "none") == 0
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 2
    line = _one_line_error(capsys)
    assert f"{b} was made with --crop none and {a} with --crop regions" in line
    assert not (tmp_path / "m").exists()


# ============================================================================ a full disk (18.4, fault injection)


class FullDisk:
    """Counts output writes; the ``fail_at``-th writes half its data, then raises ``ENOSPC``."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls = fail_at, 0
        self.failed: str | None = None

    def hit(self, what: str) -> bool:
        self.calls += 1
        if self.calls == self.fail_at:
            self.failed = what
            return True
        return False

    @staticmethod
    def error() -> OSError:
        return OSError(errno.ENOSPC, "No space left on device (injected)")


class _FillingFile:
    """A text file in append mode whose writes go through :class:`FullDisk`."""

    def __init__(self, fh: Any, disk: FullDisk) -> None:
        self._fh, self._disk = fh, disk

    def write(self, text: str) -> int:
        if self._disk.hit("csv"):
            self._fh.write(text[: len(text) // 2])
            self._fh.flush()
            raise self._disk.error()
        return int(self._fh.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _inject(mp: pytest.MonkeyPatch, disk: FullDisk) -> None:
    real_open, real_atomic = builtins.open, runtime.io.atomic_write

    def filling_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(file, mode, *args, **kwargs)
        return _FillingFile(fh, disk) if "a" in mode else fh

    def filling_bytes(path: Path | str, data: bytes) -> None:
        def write(tmp: Path) -> None:
            if disk.hit("png"):
                tmp.write_bytes(data[: len(data) // 2])
                raise disk.error()
            tmp.write_bytes(data)

        real_atomic(path, write)

    mp.setattr(csv_rows, "open", filling_open, raising=False)  # the CSV appenders' open
    mp.setattr(runtime.io, "atomic_write_bytes", filling_bytes)  # write_png's writer


def _assert_not_torn(out: Path) -> list[dict[str, str]]:
    """Every CSV row complete, every row's PNGs whole, no PNG (or temporary) half-written; returns the rows."""
    data = (out / "predictions.csv").read_bytes()
    assert data.endswith(b"\n"), f"torn last row: {data[-80:]!r}"
    with open(out / "predictions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == PRED_FIELDS
        rows = list(reader)
    for row in rows:
        assert None not in row and all(v is not None for v in row.values()), row
        float(row["score"])
        assert (out / row["overlay"]).is_file(), row["overlay"]
    pngs = list((out / "overlays").iterdir()) if (out / "overlays").is_dir() else []
    assert not [p.name for p in pngs if p.name.startswith(".")], "temporary files left behind"
    for png in pngs:
        assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED) is not None, f"{png} is half-written"
    return rows


# write order per run: 2 CSV headers, then per batch of 2 images 2 overlay PNGs and one CSV append
@table(
    "case, fail_at, writer",
    [("18.4-disk-full-b1-png", 3, "png"), ("18.4-disk-full-b1-csv", 5, "csv")]
    + [("18.4-disk-full-b2-png", 7, "png"), ("18.4-disk-full-b2-csv", 8, "csv")],
)
def test_disk_full_leaves_no_torn_output_and_the_rerun_completes(
    case: str, trained: tuple[Path, np.ndarray, Path], tmp_path: Path, fail_at: int, writer: str
) -> None:
    model, _, folder = trained
    out, n_images = tmp_path / "out", 6
    disk = FullDisk(fail_at)

    def run(where: Path) -> dict[str, Any]:
        return predict.predict_folder(model, folder, where, batch_size=2, progress=False, review=False, overlays=True)

    with pytest.MonkeyPatch.context() as mp:
        _inject(mp, disk)
        with pytest.raises(OSError) as info:
            run(out)
    assert info.value.errno == errno.ENOSPC and disk.failed == writer
    partial = _assert_not_torn(out)
    assert len(partial) < n_images

    stats = run(out)
    rows = _assert_not_torn(out)
    assert sorted(r["file"] for r in rows) == [f"scan{i}.png" for i in range(n_images)]
    assert stats["errors"] == 0 and stats["processed"] + stats["skipped_already_done"] == n_images
    assert _rows(out / "errors.csv") == []

    # the interrupted-then-resumed folder holds what one clean run writes
    clean = tmp_path / "clean"
    run(clean)
    ref = {r["file"]: r for r in _assert_not_torn(clean)}
    for row in rows:
        assert row == ref[row["file"]]
        np.testing.assert_array_equal(
            cv2.imread(str(out / row["overlay"]), cv2.IMREAD_UNCHANGED),
            cv2.imread(str(clean / ref[row["file"]]["overlay"]), cv2.IMREAD_UNCHANGED),
        )


# ============================================================================ multi-page TIFF and EXIF (28.11, 28.12)


def _pages(path: Path, n: int = 3, dtype: Any = np.uint8) -> list[np.ndarray]:
    scale = 255 if dtype == np.uint8 else 65535
    pages = [np.full((24, 32), (i + 1) * scale // (n + 1), dtype) for i in range(n)]
    for i, p in enumerate(pages):
        p[2 + i, 3] = 0  # each page differs in its pixels, not only its level
    assert cv2.imwritemulti(str(path), pages)
    return pages


def _exif_jpeg(path: Path, image: np.ndarray, orientation: int, order: str = "big") -> None:
    """``image`` as a JPEG whose EXIF (big- or little-endian) says ``orientation``."""

    def b(v: int, n: int) -> bytes:
        return v.to_bytes(n, order)  # type: ignore[arg-type]

    tiff = (b"MM" if order == "big" else b"II") + b(42, 2) + b(8, 4) + b(1, 2)
    tiff += b(0x0112, 2) + b(3, 2) + b(1, 4) + b(orientation, 2) + b"\0\0" + b(0, 4)
    payload = b"Exif\0\0" + tiff
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    data = jpeg.tobytes()
    path.write_bytes(data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:])


def _blocks() -> np.ndarray:
    """24x40 pixels of 8x8 blocks with no symmetry, so every turn is seen."""
    return np.kron(np.random.default_rng(0).integers(0, 256, (3, 5)), np.ones((8, 8))).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A bundle folder (its bundle.json) and an untrained tiny bundle that stands in for it: one fixed box."""
    from detectors.base import Detections, Detector
    from pipeline.serve.bundle import Bundle
    from reconstruction.unet import UNet, UNetConfig

    root = tmp_path_factory.mktemp("tiny") / "model"
    model = _bundle_json(root, image_size=32, **{"prior.median_box": [4.0, 8.0, 28.0, 16.0]})
    torch.manual_seed(0)

    class OneBox(Detector):
        name = "one-box-test"

        def fit(self, train: Any, val: Any, workdir: Path) -> dict[str, Any]:
            return {}

        def predict(self, images: np.ndarray) -> list[Detections]:
            return [Detections(np.array([[6, 8, 26, 16]], np.float32), np.array([0.9], np.float32)) for _ in images]

        def save(self, directory: Path) -> None:
            raise NotImplementedError

        @classmethod
        def load(cls, directory: Path) -> Detector:
            raise NotImplementedError

    doc = json.loads((model / "bundle.json").read_text())
    return model, Bundle(doc, OneBox(), UNet(UNetConfig.profile("tiny")).eval(), "cpu")


@pytest.fixture
def tiny_model(tiny: tuple[Path, Any], cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny bundle's folder; ``predict`` runs the tiny bundle when given it."""
    monkeypatch.setattr(predict, "_load_bundle", lambda *a: tiny[1])
    return tiny[0]


def _tiny_predict(model: Path, folder: Path, out: Path, *extra: str) -> list[dict[str, str]]:
    args = ["--input", str(folder), "--out", str(out), "--no-progress", "--no-review", "--workers", "0", *extra]
    assert main(["predict", "--model", str(model), *args]) == 0
    return _rows(out / "predictions.csv")


@table("case, dtype", [("28.11-tiff-pages-8bit", np.uint8), ("28.11-tiff-pages-16bit", np.uint16)])
def test_every_page_of_a_multi_page_tiff_is_a_frame(case: str, tmp_path: Path, dtype: Any) -> None:
    from scans.readers import ReadError, count_frames, frame_indices, read_image, read_scan

    path = tmp_path / "cine.tif"
    pages = _pages(path, 3, dtype)
    scale = float(np.iinfo(dtype).max)
    assert count_frames(path) == 3 and frame_indices(path, "all") == [0, 1, 2] and frame_indices(path, 2) == [2]
    for i, page in enumerate(pages):
        rr = read_scan(path, frame=i)
        assert rr.frame == i and rr.frame_count == 3
        np.testing.assert_allclose(rr.image, page / scale, atol=1e-6)
        np.testing.assert_allclose(read_image(path, frame=i), page / scale, atol=1e-6)
    for bad in (lambda: read_scan(path, frame=3), lambda: read_image(path, frame=3), lambda: frame_indices(path, 3)):
        with pytest.raises(ReadError, match="frame 3 requested but the file has 3 frame"):
            bad()


def _tiff_and_png(folder: Path) -> Path:
    folder.mkdir()
    _pages(folder / "cine.tif", 3)
    cv2.imwrite(str(folder / "still.png"), np.full((24, 32), 99, np.uint8))
    return folder


@cases("28.11-tiff-frames-all-and-2")
def test_predict_gives_one_row_per_tiff_page(case: str, tmp_path: Path, tiny_model: Path) -> None:
    folder = _tiff_and_png(tmp_path / "in")
    rows = {f: _tiny_predict(tiny_model, folder, tmp_path / f"out-{f}", "--frames", f) for f in ("all", "2")}
    keys = {f: sorted((r["file"], r["frame"]) for r in rows[f]) for f in rows}
    assert keys["all"] == [("cine.tif", "0"), ("cine.tif", "1"), ("cine.tif", "2"), ("still.png", "0")]
    assert keys["2"] == [("cine.tif", "2")]


@cases("28.11-tiff-resume")
def test_a_resumed_frames_all_run_does_each_tiff_page_once(case: str, tmp_path: Path, tiny_model: Path) -> None:
    folder, out = _tiff_and_png(tmp_path / "in"), tmp_path / "out"
    _tiny_predict(tiny_model, folder, out, "--frames", "all")
    pred = out / "predictions.csv"
    lines = pred.read_bytes().splitlines(keepends=True)
    assert [line.split(b",")[:2] for line in lines[1:3]] == [[b"cine.tif", b"0"], [b"cine.tif", b"1"]]
    pred.write_bytes(b"".join(lines[:3]))  # interrupted after page 1: page 2 and still.png are still to do
    rows = _tiny_predict(tiny_model, folder, out, "--frames", "all")
    keys = [(r["file"], r["frame"]) for r in rows]
    assert sorted(keys) == [("cine.tif", "0"), ("cine.tif", "1"), ("cine.tif", "2"), ("still.png", "0")]


@table("case, order", [("28.12-exif-big-endian", "big"), ("28.12-exif-little-endian", "little")])
def test_jpeg_exif_orientation_is_applied_and_recorded(case: str, tmp_path: Path, order: str) -> None:
    from scans.readers import read_image, read_scan

    image = _blocks()
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.jpg"
        _exif_jpeg(path, image, orientation, order)
        decoded = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)  # OpenCV applies EXIF here
        assert decoded is not None
        shown = decoded.astype(np.float32) / 255
        rr = read_scan(path)
        assert rr.orientation == orientation and rr.image.shape == shown.shape
        assert rr.original_size == (shown.shape[1], shown.shape[0])
        np.testing.assert_allclose(rr.image, shown, atol=1e-6)
        np.testing.assert_allclose(read_image(path), shown, atol=1e-6)


@cases("28.12-exif-in-predictions-csv")
def test_the_orientation_applied_is_a_column_of_predictions_csv(case: str, tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    image = _blocks()  # stored 40 wide, 24 high
    _exif_jpeg(folder / "portrait.jpg", image, 6)  # shown turned a quarter clockwise: 24 wide, 40 high
    cv2.imwrite(str(folder / "plain.jpg"), image)  # no EXIF
    cv2.imwrite(str(folder / "still.png"), image)
    rows = {r["file"]: r for r in _tiny_predict(tiny_model, folder, tmp_path / "out")}
    with open(tmp_path / "out" / "predictions.csv", newline="") as fh:
        assert next(csv.reader(fh)) == PRED_FIELDS and PRED_FIELDS[-1] == "orientation"
    turned = rows["portrait.jpg"]
    assert turned["orientation"] == "6" and (turned["width"], turned["height"]) == ("24", "40")
    assert decode_mask(turned).shape == (40, 24)
    for name in ("plain.jpg", "still.png"):
        assert rows[name]["orientation"] == "1" and (rows[name]["width"], rows[name]["height"]) == ("40", "24")


# ============================================================================ bundles (28.7, 28.9)


@cases("28.7-untampered-passes")
def test_an_untampered_bundle_json_passes_the_check(case: str, tmp_path: Path) -> None:
    from pipeline.serve.bundle_file import check_bundle_doc

    path = _bundle_json(tmp_path / "model") / "bundle.json"
    check_bundle_doc(json.loads(path.read_text()), path)


@table("case, good", [("28.9-unfit-bundle-warned", False), ("28.9-fit-bundle-quiet", True)])
def test_an_unfit_bundle_is_written_with_warnings(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], good: bool
) -> None:
    import reconstruction.checkpoint
    from detectors.prior import PriorPolicy
    from pipeline.serve import train as bundle

    validation = {"i_auroc": 0.9 if good else 0.119, "sensitivity": 0.8 if good else 0.0, "specificity": 1.0}
    monkeypatch.setattr(bundle, "fold_policy", lambda *a: PriorPolicy(0.05, (8.0, 16.0, 56.0, 32.0)))
    monkeypatch.setattr(bundle, "_thresholds", lambda *a: bundle.Thresholds(0.3, validation, 0.1, 0.2))
    monkeypatch.setattr(reconstruction.checkpoint, "save_model", lambda net, d, meta=None: Path(d).mkdir())

    class Saved:
        def save(self, directory: Path) -> None:
            directory.mkdir()

    cfg = load_config(None, "quick", ["image_size=64"])
    split = (np.arange(8), np.arange(8, 12))
    data = SimpleNamespace(arrays=SimpleNamespace(subset=lambda idx: None))
    bundle._write_bundle(cfg, tmp_path, data, split, (Saved(), {}), (None, {}))  # type: ignore[arg-type]
    doc = json.loads((tmp_path / "bundle.json").read_text())
    err = capsys.readouterr().err
    if good:
        assert doc["warnings"] == [] and "WARNING" not in err
    else:
        assert len(doc["warnings"]) == 2 and "I-AUROC 0.119" in doc["warnings"][0]
        assert "sensitivity 0.00" in doc["warnings"][1]
        assert "WARNING: the bundle written to" in err and "unfit for use" in err


# ============================================================================ datasets (28.10, 18.2, 18.3)


def _twin(root: Path, **image: Any) -> dict[str, Any]:
    """A dataset whose first distended image is listed again (as ``image`` says); returns the first entry."""
    make_dataset(root, n_patients=6, per_patient=2, size=32)
    doc = json.loads((root / "annotations.json").read_text())
    first = next(i for i in doc["images"] if i["distended"])
    doc["images"].append({**first, "id": 999, **image})
    ann = next(a for a in doc["annotations"] if a["image_id"] == first["id"])
    doc["annotations"].append({**ann, "id": 999, "image_id": 999})
    (root / "annotations.json").write_text(json.dumps(doc))
    return dict(first)


@cases("28.10-file-listed-twice")
def test_scans_check_reports_a_file_listed_twice_under_two_patients(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scans.check import check_dataset

    first = _twin(tmp_path, patient_id="someone-else", distended=False)
    reasons = [p.reason for p in check_dataset(tmp_path)]
    twice = [r for r in reasons if "listed 2 times" in r]
    assert len(twice) == 1, reasons
    assert "under 2 patients" in twice[0] and "labelled both distended and normal" in twice[0]
    assert scans_main(["check", str(tmp_path)]) == 1
    assert first["file_name"] in capsys.readouterr().err


@cases("28.10-twice-through-a-symlink")
def test_a_file_listed_twice_through_a_symlink_is_one_file(case: str, tmp_path: Path) -> None:
    from scans.check import check_dataset

    first = _twin(tmp_path, file_name="images/alias.png")
    (tmp_path / "images" / "alias.png").symlink_to(tmp_path / first["file_name"])
    assert any("listed 2 times" in p.reason for p in check_dataset(tmp_path))


# values that are wrong for most fields; "@outside" and "@absolute" become paths to a real image outside the dataset
HOSTILE_VALUES = st.sampled_from(
    [None, math.nan, math.inf, -1, 0, 1e308, 2.5, "abc", "", " ", "false", "true", "0", True, False, [], [1, 2], {}]
    + [{"a": 1}, [math.nan, 0, 1, 1], [0, 0, -5, 3], [-3, -3, 4, 4], [0, 0, 1e9, 1e9], "../x.png", "../../x.png"]
    + ["images/../../x.png", "images/nope.png", "@outside", "@absolute"]
)
IMAGE_KEYS = ("id", "file_name", "width", "height", "patient_id", "distended")
ANN_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation")
WRONG_DOCS: list[Any] = [[], None, "x", 3, {}, {"images": None}, {"images": {}}, {"images": [], "annotations": 1}]


@st.composite
def mutation(draw: st.DrawFn) -> tuple[str, Any]:
    """One edit of the annotations document: ``(kind, argument)``."""
    kind = draw(st.sampled_from(["image", "ann", "drop_image_key", "drop_ann_key", "dup_image", "dup_ann", "doc"]))
    keys = IMAGE_KEYS if kind in ("image", "drop_image_key") else ANN_KEYS
    if kind in ("image", "ann"):
        return kind, (draw(st.integers(0, 3)), draw(st.sampled_from(keys)), draw(HOSTILE_VALUES))
    if kind in ("drop_image_key", "drop_ann_key"):
        return kind, (draw(st.integers(0, 3)), draw(st.sampled_from(keys)))
    if kind in ("dup_image", "dup_ann"):
        return kind, draw(st.integers(0, 3))
    return kind, draw(st.sampled_from(WRONG_DOCS))


def _resolve(value: Any, outside: Path) -> Any:
    if value == "@outside":
        return "../" + outside.name
    if value == "@absolute":
        return str(outside)
    return value


def _apply(doc: Any, edits: list[tuple[str, Any]], outside: Path) -> tuple[Any, bool]:
    """The mutated document, and whether a problem is certain (an edit the strict schema always refuses)."""
    certain = False
    for kind, arg in edits:
        if kind == "doc":
            return copy.deepcopy(arg), True  # a document of the wrong shape ends the edits
        if kind == "image":
            n, key, value = arg
            value = _resolve(value, outside)
            doc["images"][n][key] = value
            certain |= key == "file_name" and (not isinstance(value, str) or ".." in value or value.startswith("/"))
            certain |= key == "distended" and not isinstance(value, bool)
            certain |= key == "id" and (not isinstance(value, int) or isinstance(value, bool))
        elif kind == "ann":
            n, key, value = arg
            doc["annotations"][n][key] = _resolve(value, outside)
            certain |= key == "bbox"  # no value of HOSTILE_VALUES is a valid box of its image
        elif kind == "drop_image_key":
            doc["images"][arg[0]].pop(arg[1], None)
            certain = True
        elif kind == "drop_ann_key":
            doc["annotations"][arg[0]].pop(arg[1], None)
            certain |= arg[1] in ("image_id", "category_id", "bbox")
        else:  # dup_image, dup_ann
            section = "images" if kind == "dup_image" else "annotations"
            doc[section].append(copy.deepcopy(doc[section][arg]))
            certain = True
    return doc, certain


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    """A valid 4-image dataset, its annotations document and a readable image outside its folder."""
    from scans.check import check_dataset

    base = tmp_path_factory.mktemp("prop")
    root = base / "ds"
    make_dataset(root, n_patients=2, per_patient=2, size=32)
    outside = base / "x.png"
    shutil.copy(root / "images" / "img001.png", outside)
    doc = json.loads((root / "annotations.json").read_text())
    assert check_dataset(root) == []
    return root, doc, outside


@cases("18.2+3-mutated-annotations")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(mutation(), min_size=1, max_size=3))
def test_mutated_annotations_give_named_problems_never_a_traceback(
    case: str, annotated: tuple[Path, dict[str, Any], Path], edits: list[tuple[str, Any]]
) -> None:
    from pipeline.shared.data import DataError, validate
    from scans.check import Problem, check_dataset
    from scans.dataset import load_dataset

    root, valid, outside = annotated
    doc, certain = _apply(copy.deepcopy(valid), edits, outside)
    (root / "annotations.json").write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them
    try:
        problems = check_dataset(root)
        assert isinstance(problems, list) and all(isinstance(p, Problem) and p.reason for p in problems)
        if certain:
            assert problems, f"{edits} passed the check"
        try:
            validate(root)
        except DataError as exc:
            assert problems and all(str(p) in str(exc) for p in problems)
        else:
            assert problems == []
            # what the validator passes, the loader takes, and every image stays inside the folder
            scans = load_dataset(root)
            assert len(scans) == len(valid["images"])
            assert all(root.resolve() in s.path.resolve().parents for s in scans)
    finally:
        (root / "annotations.json").write_text(json.dumps(valid))


UNPARSABLE = ["", "{", "[]", "null", '"x"', "NaN", '{"images": [null, 1, "a"]}', "[" * 5000 + "]" * 5000]


@table("case, text", [(f"18.3-annotations-unparsable-{i}", t) for i, t in enumerate(UNPARSABLE)])
def test_unparsable_or_wrongly_shaped_files_are_named(
    case: str, annotated: tuple[Path, dict[str, Any], Path], text: str
) -> None:
    from pipeline.shared.data import DataError, validate
    from scans.check import Problem, check_dataset

    root, valid, _ = annotated
    (root / "annotations.json").write_text(text)
    try:
        problems = check_dataset(root)
        assert problems and all(isinstance(p, Problem) for p in problems)
        with pytest.raises(DataError, match="problem"):
            validate(root)
    finally:
        (root / "annotations.json").write_text(json.dumps(valid))


# ============================================================================ checkpoints (18.3)


def _good(tmp: Path) -> Path:
    path = tmp / "good.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    return path


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _unet_dir(tmp: Path, damage: Callable[[Path], Any]) -> Path:
    """A saved tiny U-Net (``tmp/m``) after ``damage``."""
    from reconstruction.checkpoint import save_model
    from reconstruction.unet import UNet, UNetConfig

    save_model(UNet(UNetConfig.profile("tiny")), tmp / "m")
    damage(tmp / "m")
    return tmp / "m"


def _half(path: Path) -> Path:
    return _write(path, path.read_bytes()[: path.stat().st_size // 2])


def _list_file(tmp: Path) -> Path:
    torch.save([torch.ones(1)], tmp / "list.pt")
    return tmp / "list.pt"


def _state(make: Callable[[Path], Path]) -> Callable[[Path], Callable[[], Any]]:
    """``load_state`` of the file that ``make`` writes."""
    return lambda tmp: lambda: runtime.io.load_state(make(tmp))


def _meta(text: str | None) -> Callable[[Path], Callable[[], Any]]:
    """``load_meta`` of a ``model.json`` holding ``text`` (None: no file)."""
    return lambda tmp: (
        lambda: runtime.io.load_meta(tmp / "model.json" if text is None else _write(tmp / "model.json", text))
    )


def _unet(damage: Callable[[Path], Any], hint: str = "") -> Callable[[Path], Callable[[], Any]]:
    from reconstruction.checkpoint import load_model

    return lambda tmp: lambda: load_model(_unet_dir(tmp, damage), **({"hint": hint} if hint else {}))


def _no_config(m: Path) -> None:
    (m / "model.pt").unlink()
    (m / "model.json").write_text("{}")


# (how to build the call that must raise, the CheckpointError's message as a regular expression)
CHECKPOINTS: dict[str, tuple[Callable[[Path], Callable[[], Any]], str]] = {
    "truncated": (_state(lambda t: _half(_good(t))), r"good\.pt: is truncated or corrupt.*delete .*good\.pt"),
    "empty": (_state(lambda t: _write(_good(t), b"")), r"good\.pt: is empty or truncated"),
    "garbage": (
        _state(lambda t: _write(t / "garbage.pt", bytes(range(256)) * 8)),
        r"garbage\.pt: is not a PyTorch checkpoint",
    ),
    "missing": (_state(lambda t: t / "nope.pt"), r"nope\.pt: not found"),
    "a-folder": (_state(lambda t: t), "cannot be read"),
    "a-list": (_state(_list_file), r"list\.pt: holds a list, not a dict"),
    "wrong-shapes": (
        lambda t: lambda: runtime.io.load_weights(torch.nn.Linear(4, 2), _good(t)),
        r"good\.pt: does not fit the model",
    ),
    "meta-missing": (_meta(None), r"model\.json: not found"),
    "meta-not-json": (_meta('{"unet": '), r"model\.json: is not valid JSON"),
    "meta-a-list": (_meta("[1]"), r"model\.json: holds a JSON list"),
    "unet-truncated": (
        _unet(lambda m: _write(m / "model.pt", (m / "model.pt").read_bytes()[:1000]), hint="delete the entry m"),
        r"m/model\.pt: is truncated or corrupt .*; delete the entry m$",
    ),
    "unet-weights-missing": (_unet(lambda m: (m / "model.pt").unlink()), r"model\.pt: not found"),
    "unet-config-not-unet": (_unet(_no_config), r"model\.json: is not a U-Net config"),
}


@pytest.mark.parametrize("case", [f"18.3-checkpoint-{name}" for name in CHECKPOINTS])
def test_a_damaged_checkpoint_is_one_error_naming_the_file(case: str, tmp_path: Path) -> None:
    build, message = CHECKPOINTS[case.removeprefix("18.3-checkpoint-")]
    call = build(tmp_path)
    with pytest.raises(runtime.io.CheckpointError, match=message):
        call()


@cases("18.3-checkpoint-good-loads")
def test_good_checkpoints_load(case: str, tmp_path: Path) -> None:
    from reconstruction.checkpoint import load_model

    state = runtime.io.load_state(_good(tmp_path))
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (2, 3)
    runtime.io.load_weights(torch.nn.Linear(3, 2), tmp_path / "good.pt")
    load_model(_unet_dir(tmp_path, lambda m: None))


class _Payload:
    """Unpickling this would create ``marker`` (what a tampered checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.mkdir, (str(self.marker),))


@table("case, form", [("18.3-pickle-code-torch-save", "torch.save"), ("18.3-pickle-code-raw", "raw")])
def test_code_running_pickle_does_not_run(case: str, tmp_path: Path, form: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = {"weight": _Payload(marker)}
    if form == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused file raises the error alone, no torch warning
        with pytest.raises(runtime.io.CheckpointError, match=r"model\.pt: ") as err:
            runtime.io.load_state(path, hint="delete the cache entry X to retrain")
    assert not marker.exists()  # the payload never ran
    assert str(err.value).endswith("; delete the cache entry X to retrain")
    if form == "torch.save":
        assert "holds code or objects other than tensors" in str(err.value) and "mkdir" in str(err.value)
    # The same file through pickle itself would have run the payload: the test can fail.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


@cases("18.3-checkpoint-message-no-traceback")
def test_message_has_no_traceback(case: str, background: dict[str, Job]) -> None:
    """What a user sees: one line naming the file, not torch's traceback."""
    job = background[case]
    rc, _, err = job.wait(120)
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("runtime.io.CheckpointError: ") and str(job.ctx["path"]) in last
    assert "PytorchStreamReader" not in err and "During handling" not in err


# ============================================================================ runs, caches and provenance


def _unet_info(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "summary.json").read_text())["fold_info"][0]["unet"])


@cases("18.1+3-inverted-data-and-broken-entry")
def test_inverted_images_train_their_own_unet_and_a_broken_entry_is_rebuilt(
    case: str, tmp_path: Path, phantom: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_run(phantom, tmp_path / "a", cache)) == 0
    first = _unet_info(tmp_path / "a")
    inverted = shutil.copytree(phantom, tmp_path / "inverted")  # same annotations and splits, other pixels
    for png in (inverted / "images").glob("*.png"):
        cv2.imwrite(str(png), 255 - cv2.imread(str(png), cv2.IMREAD_GRAYSCALE))
    assert main(_run(inverted, tmp_path / "b", cache)) == 0
    second = _unet_info(tmp_path / "b")
    assert second["cached"] is False and second["cache"] != first["cache"]
    # a truncated checkpoint in a finished entry: named, moved aside, retrained
    for weights in Path(first["cache"]).glob("*.pt"):
        weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(_run(phantom, tmp_path / "c", cache)) == 0
    assert f"cache entry {first['cache']} cannot be loaded" in capsys.readouterr().err
    third = _unet_info(tmp_path / "c")
    assert third["cached"] is False and third["cache"] == first["cache"]
    assert len(list(Path(first["cache"]).parent.glob(Path(first["cache"]).name + ".broken-*"))) == 1


@cases("28.1-relative-data-run")
def test_run_with_a_relative_data_folder(
    case: str, tmp_path: Path, phantom: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(phantom, tmp_path / "ph")
    monkeypatch.chdir(tmp_path)  # `--data ph` from the folder holding ph/ (was '<cwd>/ph/ph/images/...')
    assert main(_run(Path("ph"), Path("run"), cache)) == 0
    assert (tmp_path / "run" / "summary.json").is_file()


@cases("18.5-git-no-index-lock")
def test_provenance_reads_git_without_taking_its_lock(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain ``git status`` on a stale index rewrites it through ``.git/index.lock``; provenance must not."""
    from pipeline import provenance

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    (repo / "f.txt").write_text("a\n")
    for cmd in (["init", "-q"], ["add", "f.txt"], ["commit", "-qm", "init"]):
        subprocess.run([*git, *cmd], check=True, capture_output=True)
    (repo / "f.txt").write_text("b\n")
    later = time.time() + 5
    os.utime(repo / "f.txt", (later, later))  # the index's stat data is stale: status would refresh it
    before = os.stat(repo / ".git").st_mtime_ns, os.stat(repo / ".git" / "index").st_mtime_ns
    monkeypatch.setattr(provenance, "REPO", repo)
    assert provenance.git_commit().endswith("+dirty")
    assert (os.stat(repo / ".git").st_mtime_ns, os.stat(repo / ".git" / "index").st_mtime_ns) == before


@cases("18.5-writes-only-out-and-cache")
def test_run_writes_only_into_out_and_the_cache(case: str, background: dict[str, Job]) -> None:
    """A fresh HOME and TMPDIR stay empty, and the code the run executes gains no file."""
    job = background[case]
    rc, _, err = job.wait(300)
    assert rc == 0, err[-3000:]
    code, env = job.ctx["code"], job.ctx["env"]
    where = subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
        env=env,
        cwd=job.ctx["dirs"][2],
        capture_output=True,
    )
    assert Path(where.stdout.decode().strip()).parent == code / "pipeline"  # the copy runs, not the checkout
    assert (job.ctx["out"] / "summary.json").is_file()
    assert all(_files(d) == set() for d in job.ctx["dirs"])  # HOME, TMPDIR and the working folder
    assert _files(code) == job.ctx["before"]


@cases("28.14-cache-is-a-file-at-start-up")
def test_a_loris_cache_that_is_a_file_is_named_at_start_up(case: str, background: dict[str, Job]) -> None:
    """In a fresh process: torch would otherwise fail on import, creating its inductor cache in it."""
    job = background[case]
    rc, _, err = job.wait(120)
    blocker = job.ctx["blocker"]
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert f"LoRIS cache {blocker}" in err and "LORIS_CACHE" in err
    assert not job.ctx["out"].exists() and blocker.read_text() == "not a folder"


@cases("28.14-usable-cache-passes")
def test_cache_home_check_passes_a_usable_folder(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.env import check_cache_home

    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "new" / "cache"))
    assert check_cache_home() == tmp_path / "new" / "cache" and _files(tmp_path / "new") == {"cache"}
    shutil.rmtree(tmp_path / "new")


@cases("28.18-cache-records-how-trained")
def test_the_cache_records_how_a_model_was_trained_and_reports_it_on_reuse(case: str, tmp_path: Path) -> None:
    from pipeline.shared.cache import cached_info, fit_or_load, publish

    entry = tmp_path / "unet-single-1"

    def save(p: Path) -> None:
        p.mkdir()
        (p / "model.txt").write_text("m")

    def fit() -> tuple[str, dict[str, Any]]:
        publish(entry, save, {"fit_s": 1.0})
        return "m", {"fit_s": 1.0}

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model, info = fit_or_load(entry, lambda p: (p / "model.txt").read_text(), fit)
        torch.set_num_threads(2)
        again, reused = fit_or_load(entry, lambda p: (p / "model.txt").read_text(), fit)
    finally:
        torch.set_num_threads(before)
    trained = {"world_size": 1, "distributed_backend": None, "torch_threads": 1}
    assert info["cached"] is False and info["trained_with"] == trained
    assert reused["cached"] is True and reused["trained_with"] == trained  # not this process's 2 threads
    assert cached_info(entry) == {"fit_s": 1.0, "trained_with": trained}


@cases("28.17-summary-runtime-and-reused-models")
def test_summary_json_records_world_size_backend_threads_and_reused_models(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evaluation.results import FoldResult
    from pipeline import provenance
    from pipeline.experiment import run
    from pipeline.experiment.fold import FoldOutput
    from pipeline.run_dirs import write_json

    trained = {"world_size": 2, "distributed_backend": "gloo", "torch_threads": 4}
    info = {
        "unet": {"cached": True, "cache": "c/unet-single-x", "trained_with": trained},
        "detector_yolov5": {"cached": False, "cache": "c/det", "refiner": {"cached": True, "cache": "c/ref"}},
    }
    fo = FoldOutput(FoldResult(fold=0), info=info)
    monkeypatch.setattr(run, "plan", lambda *a, **k: None)
    monkeypatch.setattr(run, "run_folds", lambda p: ([fo], 0))
    monkeypatch.setattr(run, "aggregate", lambda p, outputs: {})
    summary_json = tmp_path / "out" / "summary.json"
    monkeypatch.setattr(run, "report", lambda p, outputs, summary: write_json(summary_json, summary))
    cfg = load_config(None, "quick", ["threads=1"])
    threads = torch.get_num_threads()
    try:
        run.execute(cfg, tmp_path / "out", ["gt"])
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["runtime"] == {"world_size": 1, "distributed_backend": None, "torch_threads": 1}
    assert summary["reused_models"] == [
        {"fold": 0, "model": "unet", "cache": "c/unet-single-x", "trained_with": trained},
        {"fold": 0, "model": "detector_yolov5/refiner", "cache": "c/ref", "trained_with": None},
    ]
    machine = provenance.machine()
    assert {"world_size", "distributed_backend", "torch_threads"} <= set(machine)


# ============================================================================ Ray (28.19, 28.4)


class _FakeRay:
    """Stands in for the ``ray`` module: records ``init``'s arguments and the environment it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], dict[str, str]]] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs: Any) -> None:
        self.calls.append((kwargs, dict(os.environ)))


@cases("28.19-ray-starts-offline")
def test_local_ray_is_started_without_dashboard_usage_stats_or_metadata_probe(
    case: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pipeline.serve.predict.ray_engine import _start_ray

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    started, scratch = _start_ray(None, 2)
    assert started and len(fake.calls) == 1
    kwargs, env = fake.calls[0]
    assert kwargs["include_dashboard"] is False and env["RAY_USAGE_STATS_ENABLED"] == "0"
    # Ray's API server runs without the dashboard and probes cloud metadata unless this file exists
    ray_home = Path(env["HOME"])
    assert ray_home != tmp_path / "home" and (ray_home / "ray_bootstrap_config.yaml").read_text() == "{}\n"
    assert kwargs["runtime_env"] == {"env_vars": {"HOME": str(tmp_path / "home")}}  # the actors keep theirs
    assert os.environ["HOME"] == str(tmp_path / "home")  # and so does this process
    if scratch is not None:
        shutil.rmtree(scratch)
    _start_ray("ray://cluster:10001", 2)  # joining a cluster: this driver reports nothing either
    assert fake.calls[1][1]["RAY_USAGE_STATS_ENABLED"] == "0"


@cases("28.4-ray-actor-non-utf8-names")
def test_ray_actors_get_names_that_are_not_utf8(case: str, model: Path, scan: np.ndarray, tmp_path: Path) -> None:
    from pipeline.serve.predict import Outputs, ReadOptions
    from pipeline.serve.predict.ray_engine import BundleActor

    folder = _scans(tmp_path / "in", scan, n=1)
    bad = bytes(folder) + b"/=bad\xff.png"
    shutil.copyfile(bytes(folder) + b"/s0.png", bad)
    out = tmp_path / "out"
    out.mkdir()
    actor = BundleActor(str(model), "cpu", str(folder), str(out), ReadOptions(), Outputs(), 1)
    # as the driver sends them through Arrow: bytes
    batch = {"path": np.array([bad], dtype=object), "rel": np.array([b"=bad\xff.png"], dtype=object)}
    got = actor(batch | {"frame": np.array([0])})
    (row,) = [json.loads(r) for r in got["row"]]
    assert list(got["kind"]) == ["row"] and row["file"] == "'=bad\\xff.png" and set(row) == set(PRED_FIELDS)
    assert row["orientation"] == 1  # the Ray rows record the orientation too (a PNG: none)


# ============================================================================ PatchCore's memory (28.16)


@pytest.mark.parametrize("case", ["28.16-coreset-memory-seed-1", "28.16-coreset-memory-seed-2"])
def test_coreset_step_memory_is_bounded(case: str, background: dict[str, Job]) -> None:
    """The bank step's resident growth is the bank's copy, its projection and one chunk: 37 MiB with our sampler,
    123 to 176 MiB with anomalib's (which ran away to the cap in some seeds), for a bound of 62 MiB."""
    rc, out, err = background[case].wait(300)
    assert rc == 0, err[-2000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["error"] is None, f"the coreset step ran out of its {HEADROOM / 1e9:.0f} GB headroom: {res}"
    assert res["record"]["memory_bank"] == int(N_PATCHES * RATIO)
    assert res["growth_mib"] < GROWTH_BOUND_MIB, res


def _anomalib_indices(bank: torch.Tensor, ratio: float, seed: int) -> list[int]:
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

    torch.manual_seed(seed)
    np.random.seed(seed)
    return KCenterGreedy(bank, ratio).select_coreset_idxs()


def _banks() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    dup = torch.randn(40, 24, generator=gen)[torch.randint(0, 40, (1200,), generator=gen)]  # 40 distinct patches
    return {
        "bank": torch.randn(3000, 152, generator=gen),
        "narrow": torch.randn(1000, 40, generator=gen),
        "duplicates": dup,  # fewer distinct patches than the coreset keeps: distances reach zero, ties everywhere
        "blank": torch.zeros(500, 8),  # one patch repeated (a blank background)
    }


@table(
    "case, name, seed",
    [(f"28.16-same-coreset-{n}-seed-{s}", n, s) for n in ("bank", "narrow", "duplicates", "blank") for s in (0, 7)],
)
def test_same_coreset_as_anomalib(case: str, name: str, seed: int) -> None:
    from reconstruction.peers.anomalib_peers import k_center_greedy

    bank = _banks()[name]
    expected = _anomalib_indices(bank, 0.1, seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    got = k_center_greedy(bank, 0.1, chunk_rows=256)  # several chunks per step
    assert got.tolist() == expected
    torch.manual_seed(seed)
    np.random.seed(seed)
    assert k_center_greedy(bank, 0.1).tolist() == expected  # default chunking: one chunk here


@cases("28.16-empty-coreset-refused")
def test_empty_coreset_refused(case: str) -> None:
    from reconstruction.peers.anomalib_peers import k_center_greedy

    with pytest.raises(ValueError, match="coreset"):
        k_center_greedy(torch.randn(5, 8), 0.1)  # fewer than one sample to keep, as anomalib refuses


@cases("28.16-no-graph-no-allocation-per-step")
def test_sampler_builds_no_graph_and_allocates_nothing_per_step(case: str) -> None:
    """Only the setup allocates tensors of the bank's length; the greedy steps allocate none (anomalib: one each)."""
    from torch.profiler import ProfilerActivity, profile

    from reconstruction.peers.anomalib_peers import k_center_greedy

    bank = torch.randn(4000, 64, requires_grad=True)  # a bank that would record an autograd graph
    torch.manual_seed(0)
    np.random.seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        idx = k_center_greedy(bank, 0.05)  # 200 steps
    assert not idx.requires_grad and idx.dtype == torch.long and idx.shape == (200,)
    big = [e for e in prof.events() if e.cpu_memory_usage >= 4000 * 8]  # >= two floats per patch
    assert len(big) < 20, [(e.name, e.cpu_memory_usage) for e in big][:20]
