"""The layout step (issue 27) changes no result: the quick profile's ``summary.json`` and a bundle's
``predictions.csv`` come out byte-identical at HEAD and at the commit before the move.

Slow and end to end (a few minutes): it checks out the base commit in a temporary git worktree, runs the same
commands there and here, each through ``python -m pipeline`` with ``PYTHONPATH`` at its own tree and a model
cache of its own, and compares the files. ``python tests/integration/test_identity.py ROOT OUT`` runs one side by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TINY_PHANTOM

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
BASE = "56ee89f"  # "Issue 25: U-Net profile lite0 ...", the last commit before the layout step

# the tiny phantom and one-epoch settings of tests/integration/test_pipeline_e2e.py, passed to both trees
TINY = [
    *TINY_PHANTOM,
    "unet.epochs=1",
    "riad.epochs=1",
    "riad.ks=[2,8]",
    "threads=2",
    "detector.options={epochs: 1, imgsz: 64, batch: 8}",
]
PREDICT_IMAGES = 8

# summary.json values that differ between two runs of the same commit (found by running the base twice): the
# seconds, i.e. timing's "*_s" keys (total_s, unet_fit_s, inference_s, inference_images_per_s...) and each fold's
# model "fit_s". Everything else (timing.resumed_folds, paths and cache keys: each side runs in the same folder)
# must match.
SECONDS = "_s"


def _sets(cache: Path) -> list[str]:
    return [a for s in [*TINY, f"cache_dir={cache / 'models'}"] for a in ("--set", s)]


def _pipeline(root: Path, work: Path, cache: Path, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(root), "LORIS_CACHE": str(cache), "PYTHONHASHSEED": "0"}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pipeline", *args, "--no-progress"]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args[:1])} at {root}: rc {done.returncode}\n{done.stderr[-4000:]}"


def run_side(root: Path, out: Path) -> None:
    """``run --detector gt``, then ``train`` and ``predict`` on a few phantom images, all under ``out``."""
    out.mkdir(parents=True)
    cache = out / "cache"
    quick = ["--profile", "quick", *_sets(cache)]
    _pipeline(root, out, cache, ["run", "--detector", "gt", "--out", "run", *quick])
    _pipeline(root, out, cache, ["train", "--detector", "yolov5", "--out", "model", *quick])
    phantom = min((cache / "phantom").rglob("*.png"))  # the phantom the run wrote into the cache
    images = out / "images"
    images.mkdir()
    for png in sorted(phantom.parent.glob("*.png"))[:PREDICT_IMAGES]:
        shutil.copy(png, images / png.name)
    _pipeline(root, out, cache, ["predict", "--model", "model", "--input", "images", "--out", "pred", "--no-review"])


def normalised_summary(path: Path) -> str:
    """``summary.json`` without its wall-clock seconds (:data:`SECONDS`), as canonical JSON text."""
    doc = json.loads(path.read_text())
    timing = doc.get("timing") or {}
    for key in [k for k in timing if k.endswith(SECONDS)]:
        del timing[key]
    for fold in doc.get("fold_info") or []:
        for part in fold.values():
            if isinstance(part, dict):
                part.pop("fit_s", None)
    return json.dumps(doc, indent=1, sort_keys=True)


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a checkout of the repository")
    tree = tmp_path_factory.mktemp("base") / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), BASE], check=True)
    yield tree
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def test_quick_profile_outputs_identical_to_base(base_tree: Path, tmp_path: Path) -> None:
    # each side runs in the same folder (then moved aside), so that paths written into the outputs match
    side = tmp_path / "side"
    run_side(base_tree, side)
    base = side.rename(tmp_path / "base")
    run_side(REPO, side)
    head = side.rename(tmp_path / "head")
    assert normalised_summary(head / "run" / "summary.json") == normalised_summary(base / "run" / "summary.json")
    assert (head / "pred" / "predictions.csv").read_bytes() == (base / "pred" / "predictions.csv").read_bytes()


if __name__ == "__main__":
    run_side(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
