"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from runtime.env import setup_environment

# Under CI=true a skipped test fails (the CI machine installs everything the suite needs), except these,
# each skipped on purpose; the key is the node id, parameters stripped. Deselection (-m 'not slow') is no skip.
CI_ALLOWED_SKIPS = {
    # GPL-3.0 decoder (pylibjpeg-libjpeg) is opt-in: pip install .[jpeg-lossless]
    "tests/scans/test_scans_dicom.py::test_jpeg_lossless_process14_equals_rle": "pylibjpeg-libjpeg is GPL-3.0, opt-in",
}

# as `python -m pipeline` does (runtime.env.setup_environment): the LoRIS cache for torch's and matplotlib's
# caches, ultralytics offline, matplotlib's Agg backend, and passive OpenMP waiting (spinning OpenMP threads
# starve the other process on a shared 2-core machine)
setup_environment(cli_defaults=True)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads; one thread keeps timings stable on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _skip_reason(longrepr: object) -> str:
    """The reason of a skip report (``longrepr`` is ``(path, lineno, "Skipped: reason")``)."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, lineno, reason = longrepr
        return f"{str(reason).removeprefix('Skipped: ')} ({path}:{lineno})"
    return str(longrepr)


def _strict_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turns a skip not in ``CI_ALLOWED_SKIPS`` into a failure that names the reason."""
    if not report.skipped or hasattr(report, "wasxfail") or report.nodeid.split("[", 1)[0] in CI_ALLOWED_SKIPS:
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, which allows no skips: {_skip_reason(report.longrepr)}\n"
        "Install what the test needs in .ci/run, or name it in CI_ALLOWED_SKIPS (tests/conftest.py) with a reason."
    )


class _StrictSkips:
    """A plugin, registered for the whole session so it also covers the packages' doctests."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        _strict_skip(report)
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
        self, collector: pytest.Collector
    ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        report = yield  # a module-level pytest.importorskip or pytest.skip(allow_module_level=True)
        _strict_skip(report)
        return report


# Under pytest-xdist (`make test`, --no-loadscope-reorder) the longest files start first, so that no worker is
# left running one of them alone at the end; their order is that of their durations (pytest --durations). Files
# are named by basename (unique across tests/).
LONGEST_FIRST = (
    "test_pipeline_e2e.py",
    "test_hostile_corpus.py",
    "test_pipeline_predict.py",
    "test_determinism.py",
    "test_packaging.py",
    "test_peers.py",
    "test_pipeline_compare.py",
    "test_yolov5.py",
    "test_pipeline_aggregate.py",
)


# tests/integration/ holds the end-to-end tests (commands, subprocesses, torchrun, the identity check): each
# gets the `integration` marker here, so `-m integration` and `-m 'not integration'` need no marker in the files
INTEGRATION = Path(__file__).parent / "integration"


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in item.path.parents and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
    if "PYTEST_XDIST_WORKER" in os.environ:  # every worker sorts alike, as xdist requires
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("CI", "").lower() == "true" and not config.pluginmanager.has_plugin("loris-strict-skips"):
        config.pluginmanager.register(_StrictSkips(), "loris-strict-skips")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache of the module's own, so its tests reuse each other's models and no one else's."""
    return tmp_path_factory.mktemp("loris-cache")


@pytest.fixture
def module_cache_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``LORIS_CACHE`` pointed at :func:`cache` (use with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    monkeypatch.setenv("LORIS_CACHE", str(cache))
