"""Hostile and clumsy inputs to ``run`` (issue 18): content-keyed caches, datasets validated before
anything trains, messages instead of tracebacks, a broken cache entry rebuilt, the run folder locked,
and nothing written outside ``--out`` and the LoRIS cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import pytest

from pipeline import provenance
from pipeline.__main__ import main

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "scans", "detectors", "reconstruction", "evaluation", "configs")
# One fold of a tiny phantom; RIAD and figures off: these tests are about inputs, not metrics.
QUICK = [
    "--profile",
    "quick",
    "--no-progress",
    "--folds",
    "0",
    *("--set", "image_size=64", "--set", "folds=2", "--set", "unet.epochs=1", "--set", "threads=1"),
    *("--set", "riad.enabled=false", "--set", "evaluation.figures=false"),
]
PHANTOM = ["phantom.images=32", "phantom.distended=12", "phantom.patients=12", "phantom.size=64"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scans.phantom import generate_dataset

    root = tmp_path_factory.mktemp("phantom") / "data"
    return generate_dataset(root, n_images=32, n_distended=12, n_patients=12, size=64, seed=0, progress=False)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORIS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _run(data: Path, out: Path, cache: Path, *extra: str) -> int:
    args = ["run", "--data", str(data), "--out", str(out), *QUICK, "--set", f"cache_dir={cache / 'models'}"]
    return main([*args, *extra])


def _unet(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "summary.json").read_text())["fold_info"][0]["unet"])


def test_inverted_images_train_their_own_unet_and_a_broken_entry_is_rebuilt(
    tmp_path: Path, phantom: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(phantom, tmp_path / "a", cache) == 0
    first = _unet(tmp_path / "a")
    inverted = shutil.copytree(phantom, tmp_path / "inverted")  # same annotations and splits, other pixels
    for png in (inverted / "images").glob("*.png"):
        cv2.imwrite(str(png), 255 - cv2.imread(str(png), cv2.IMREAD_GRAYSCALE))
    assert _run(inverted, tmp_path / "b", cache) == 0
    second = _unet(tmp_path / "b")
    assert second["cached"] is False and second["cache"] != first["cache"]
    # a truncated checkpoint in a finished entry: named, moved aside, retrained
    for weights in Path(first["cache"]).glob("*.pt"):
        weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert _run(phantom, tmp_path / "c", cache) == 0
    assert f"cache entry {first['cache']} cannot be loaded" in capsys.readouterr().err
    third = _unet(tmp_path / "c")
    assert third["cached"] is False and third["cache"] == first["cache"]
    assert len(list(Path(first["cache"]).parent.glob(Path(first["cache"]).name + ".broken-*"))) == 1


def _edit(key: str, change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        change(doc[key][0] if key == "annotations" else doc["images"][0])

    return edit


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda entry: entry.__setitem__(field, value)


def _bbox(i: int, value: float) -> Callable[[dict[str, Any]], None]:
    return lambda ann: ann["bbox"].__setitem__(i, value)


def _duplicate_id(doc: dict[str, Any]) -> None:
    doc["images"][1]["id"] = doc["images"][0]["id"]


BAD = {
    "negative box": (_edit("annotations", _bbox(0, -5.0)), "lies outside"),
    "zero-size box": (_edit("annotations", _bbox(2, 0.0)), "has no area"),
    "out-of-image box": (_edit("annotations", _bbox(0, 60.0)), "lies outside the 64x64 image"),
    "NaN box": (_edit("annotations", _bbox(1, float("nan"))), "non-finite"),
    "duplicate image id": (_duplicate_id, "duplicate image id"),
    "string boolean": (_edit("images", _set("distended", "false")), "not a JSON boolean"),
    "file_name escaping": (_edit("images", _set("file_name", "../../outside/x.png")), "outside the dataset folder"),
    "absolute file_name": (_edit("images", _set("file_name", "/etc/hostname")), "is absolute"),
    "not an object": (lambda doc: doc.clear(), "must be a JSON object"),
}


@pytest.mark.parametrize("external", [False, True], ids=["data", "external"])
@pytest.mark.parametrize("case", list(BAD))
def test_invalid_data_is_refused_before_training(
    tmp_path: Path, phantom: Path, cache: Path, capsys: pytest.CaptureFixture[str], case: str, external: bool
) -> None:
    mutate, reason = BAD[case]
    bad = shutil.copytree(phantom, tmp_path / "bad")
    doc = json.loads((bad / "annotations.json").read_text())
    mutate(doc)
    (bad / "annotations.json").write_text(json.dumps([] if case == "not an object" else doc))
    if external:  # a held-out set is checked like the training data
        code = _run(phantom, tmp_path / "out", cache, "--external", str(bad))
    else:
        code = _run(bad, tmp_path / "out", cache)
    err = capsys.readouterr().err
    assert code == 2 and reason in err and "nothing was trained" in err and "Traceback" not in err, err
    assert not (cache / "models").exists() and not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tmp_path: Path, phantom: Path, cache: Path, capsys: Any) -> None:
    (tmp_path / "out").write_text("precious")
    assert _run(phantom, tmp_path / "out", cache) == 2
    assert "is an existing file" in capsys.readouterr().err and (tmp_path / "out").read_text() == "precious"


def test_a_second_run_into_a_locked_folder_refuses_naming_the_holder(
    tmp_path: Path, phantom: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipeline.outputs import run_lock\n"
            f"with run_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert _run(phantom, out, cache) == 2
        assert f"in use by another LoRIS process (PID {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "config.yaml").exists()  # the refused run wrote nothing


def test_provenance_reads_git_without_taking_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain ``git status`` on a stale index rewrites it through ``.git/index.lock``; provenance must not."""
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


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_run_writes_only_into_out_and_the_cache(tmp_path: Path, phantom: Path) -> None:
    """A fresh HOME and TMPDIR stay empty, and the code the run executes gains no file."""
    code = tmp_path / "code"
    for name in PACKAGES:
        shutil.copytree(REPO / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    home, tmp, cache, cwd = (tmp_path / n for n in ("home", "tmp", "cache", "cwd"))
    for d in (home, tmp, cwd):
        d.mkdir()
    before = _files(code)
    keep = ("PATH", "LANG", "LC_ALL", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "LORIS_CACHE": str(cache), "PYTHONPATH": str(code)}
    env |= {"PYTHONPYCACHEPREFIX": str(cache / "pyc"), "PYTHONSAFEPATH": "1"}  # bytecode outside the code
    where = subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], env=env, cwd=cwd, capture_output=True
    )
    assert Path(where.stdout.decode().strip()).parent == code / "pipeline"  # the copy runs, not the checkout
    cmd = [sys.executable, "-m", "pipeline", "run", "--out", str(tmp_path / "out"), *QUICK]
    cmd += [a for s in [*PHANTOM, f"cache_dir={cache / 'models'}"] for a in ("--set", s)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "summary.json").is_file()
    assert _files(home) == set() and _files(tmp) == set() and _files(cwd) == set()
    assert _files(code) == before
