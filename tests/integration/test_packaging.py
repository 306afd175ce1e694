"""The wheel on its own: built from a copy of the sources, installed into a fresh virtualenv outside the
checkout, and run from an unrelated folder with the checkout not importable (``loris run``, ``train``,
``predict``). Also: every package folder of the source tree is listed in pyproject.toml, the wheel
carries the configs (``loris_configs``), and every module imports. .ci/run also runs this file with
Python 3.13 (.venv313) as that version's smoke test."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import TINY_PHANTOM, quick_bundle_sets, set_args
from tests.network_guard import guarded_env

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
# every command runs here at most this long (each takes seconds on an idle 2-core machine)
STEP_TIMEOUT = 300


def _source_packages() -> dict[str, Path]:
    """Every folder with an ``__init__.py`` under the checkout's top-level packages (``tests`` aside), by the
    dotted name it installs as (``package-dir`` renames, e.g. ``configs`` -> ``loris_configs``)."""
    renamed = {Path(d).parts[0]: name for name, d in SETUPTOOLS.get("package-dir", {}).items() if name}
    found: dict[str, Path] = {}
    for top in sorted(REPO.iterdir()):
        if not (top / "__init__.py").is_file() or top.name == "tests":
            continue
        for init in sorted(top.rglob("__init__.py")):
            rel = init.parent.relative_to(REPO).parts
            if any(p == "__pycache__" or p.startswith(".") for p in rel):
                continue
            found[".".join((renamed.get(rel[0], rel[0]), *rel[1:]))] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """setuptools installs only the packages pyproject.toml lists: a new subpackage must be added there."""
    listed = set(SETUPTOOLS["packages"])
    found = _source_packages()
    assert {"pipeline", "detectors", "reconstruction", "evaluation", "scans", "loris_configs"} <= set(found)
    missing = sorted(set(found) - listed)
    assert not missing, f"package folders missing from [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(listed - set(found))
    assert not stale, f"pyproject.toml lists packages with no folder (or no __init__.py): {stale}"


def test_every_module_imports() -> None:
    """Each module of every listed package imports (optional extras are imported lazily, where used)."""
    failed: dict[str, str] = {}
    count = 0
    for top in sorted(p for p in SETUPTOOLS["packages"] if "." not in p):
        package = importlib.import_module(top)
        names = [
            m.name
            for m in pkgutil.walk_packages(
                package.__path__, f"{top}.", onerror=lambda n: failed.setdefault(n, "does not import")
            )
        ]
        for name in names:
            count += 1
            try:
                importlib.import_module(name)
            except Exception as exc:  # every failure is listed, not only the first
                failed[name] = f"{type(exc).__name__}: {exc}"
    assert count > 50, f"only {count} modules found"
    assert not failed, "modules that do not import:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(failed.items()))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built offline from a copy of pyproject.toml, the README and the package folders (building
    in the checkout would leave build/ behind and race other builds)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for top in sorted({p.relative_to(REPO).parts[0] for p in _source_packages().values()}):
        shutil.copytree(REPO / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*cmd, str(src), "-w", str(root / "dist")], cwd=root)
    (whl,) = (root / "dist").glob("loris-*.whl")
    return whl


def test_wheel_carries_configs_and_every_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = REPO / "configs"
    expected = {"loris_configs/default.yaml"}
    for pattern in ("profiles/*.yaml", "detectors/*.py", "detectors/*.yaml"):
        files = sorted(configs.glob(pattern))
        assert files, f"configs/{pattern} matches nothing in the checkout"
        expected |= {f"loris_configs/{f.relative_to(configs).as_posix()}" for f in files}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    for package in SETUPTOOLS["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert not [n for n in names if n.startswith("tests/")], "the tests must not be installed"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "loris = pipeline.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed (no dependencies); a ``.pth`` file, written after the
    install, appends this interpreter's site-packages so the heavy dependencies (torch, ...) are reused,
    not copied. Only the paths of that ``.pth`` are added: the editable-install hook of the checkout
    (``__editable__.loris-*.pth`` there) is not processed, so the checkout stays unimportable."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    py = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index"]
    _run([*pip, str(wheel)], cwd=root.parent)
    code = "import sysconfig, json; print(json.dumps(sorted({sysconfig.get_path(k) for k in ('purelib', 'platlib')})))"
    site = Path(json.loads(_run([str(py), "-c", code], cwd=root.parent))[0])
    deps = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (site / "zz_loris_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return root


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(LORIS_CACHE=str(cache), YOLO_CONFIG_DIR=str(cache / "ultralytics"), YOLO_OFFLINE="1", MPLBACKEND="Agg")
    return guarded_env(env)


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Runs ``cmd``; on failure the assertion shows the command and the tail of its output."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=STEP_TIMEOUT
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}"
    return proc.stdout


def test_installed_wheel_runs_trains_and_predicts_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    loris = venv / "bin" / "loris"
    assert loris.is_file(), "the wheel installed no `loris` console script"
    assert str(venv / "bin" / "python") in loris.read_text().splitlines()[0], "the script runs another Python"

    probe = (
        "import json, sys, pipeline, loris_configs, pipeline.config as c;"
        "print(json.dumps([pipeline.__file__, loris_configs.__file__, str(c.CONFIG_DIR), sys.path]))"
    )
    pipeline_file, configs_file, config_dir, path = json.loads(
        _run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=_env(tmp_path / "probe"))
    )
    for f in (pipeline_file, configs_file, config_dir):
        assert Path(f).is_relative_to(venv), f"{f} is not the installed copy in {venv}"
    assert str(REPO) not in path, "the checkout is importable"

    # (a) `loris run` and (b) `loris train` at once, one thread each: two processes fill the 2 cores
    common = [*set_args(["unet.epochs=1", "threads=1"]), "--no-progress"]
    run_cache = tmp_path / "run-cache"
    run_sets = [*TINY_PHANTOM, "riad.epochs=1", "riad.ks=[2,8]", f"cache_dir={run_cache / 'models'}"]
    run_cmd = [str(loris), "run", "--detector", "gt", "--profile", "quick", "--out", str(tmp_path / "run")]
    run_log = tmp_path / "run.log"
    with open(run_log, "w") as log:
        running = subprocess.Popen(
            [*run_cmd, *set_args(run_sets), *common], cwd=tmp_path, env=_env(run_cache), stdout=log, stderr=log
        )
        try:
            # train: the tiny phantom of tests/helpers.train_quick_bundle (YOLOv5u, one epoch, no refiner);
            # `gt` is not trainable (a bundle needs a detector)
            cache = tmp_path / "train-cache"
            sets = quick_bundle_sets(cache)
            model = tmp_path / "model"
            train = [str(loris), "train", "--detector", "yolov5", "--profile", "quick", "--out", str(model)]
            _run([*train, *set_args(sets), *common], cwd=tmp_path, env=_env(cache))
            assert (model / "bundle.json").is_file()

            scans = tmp_path / "scans"
            scans.mkdir()
            for png in sorted((cache / "phantom").rglob("*.png"))[:3]:
                shutil.copy2(png, scans / png.name)
            assert len(list(scans.iterdir())) == 3
            out = tmp_path / "predicted"
            predict = [str(loris), "predict", "--model", str(model), "--input", str(scans), "--out", str(out)]
            _run([*predict, "--no-progress"], cwd=tmp_path, env=_env(cache))
            rows = (out / "predictions.csv").read_text().splitlines()
            assert rows[0].startswith("file,") and sorted(r.split(",")[0] for r in rows[1:]) == sorted(
                p.name for p in scans.iterdir()
            )
        finally:
            try:
                code = running.wait(timeout=STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                running.kill()
                raise
    assert code == 0, f"{' '.join(run_cmd)} exited {code}:\n{run_log.read_text()[-4000:]}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["detector"] == "gt" and summary["profile"] == "quick"
    assert (tmp_path / "run" / "table1.md").is_file()
