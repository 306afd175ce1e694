"""The network guard, a pytest plugin (``-p network_guard`` in pyproject.toml) so it also covers the
packages' doctests: any test that connects to a non-loopback address fails.

It guards this process (:func:`no_network`) and the Python processes the tests start: at start-up it puts
``netguard_site/`` (whose ``sitecustomize`` installs an audit hook) first on ``PYTHONPATH`` and turns it on
with ``LORIS_NETGUARD=1``; their attempts land in a log (``LORIS_NETGUARD_LOG``), and a test during which the
log grows fails, even if the subprocess swallowed the error. A test that builds a subprocess's environment
from scratch keeps the guard with :func:`guarded_env`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

# ultralytics probes the network on import unless told it is offline.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


class NetworkAccessError(RuntimeError):
    pass


def _is_local(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return True  # AF_UNIX paths and the like
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard_connect(self: socket.socket, address, *args, **kwargs):  # type: ignore[no-untyped-def]
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(host):
        raise NetworkAccessError(f"test tried to connect to {address!r}: LoRIS must work offline")
    return _real_connect(self, address, *args, **kwargs)


def _guard_connect_ex(self: socket.socket, address, *args, **kwargs):  # type: ignore[no-untyped-def]
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(host):
        raise NetworkAccessError(f"test tried to connect to {address!r}: LoRIS must work offline")
    return _real_connect_ex(self, address, *args, **kwargs)


def _guard_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
    if not _is_local(host):
        raise NetworkAccessError(f"test tried to resolve {host!r}: LoRIS must work offline")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Active for every test: any non-loopback connection or DNS lookup raises."""
    monkeypatch.setattr(socket.socket, "connect", _guard_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guard_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", _guard_getaddrinfo)


# --- subprocesses: netguard_site/sitecustomize.py --------------------------------------------------------

SITE = Path(__file__).resolve().with_name("netguard_site")
SWITCH, LOG = "LORIS_NETGUARD", "LORIS_NETGUARD_LOG"


class SubprocessNetworkError(NetworkAccessError):
    pass


@dataclass(frozen=True)
class _Guard:
    log: Path
    saved: dict[str, str | None]  # the environment variables set here, as they were


_GUARD = pytest.StashKey[_Guard]()


def _with_site(pythonpath: str | None) -> str:
    """``pythonpath`` with :data:`SITE` first (once)."""
    entries = [p for p in (pythonpath or "").split(os.pathsep) if p and p != str(SITE)]
    return os.pathsep.join([str(SITE), *entries])


def guarded_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` (a subprocess's environment built from scratch) with this session's guard switched on."""
    out = dict(env)
    out.update({k: os.environ[k] for k in (SWITCH, LOG) if k in os.environ})
    out["PYTHONPATH"] = _with_site(out.get("PYTHONPATH"))
    return out


def new_lines(log: Path, start: int) -> list[str]:
    """The lines appended to ``log`` after its first ``start`` bytes."""
    try:
        with log.open("rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def check_log(log: Path, start: int = 0) -> None:
    """Raises :class:`SubprocessNetworkError` listing the attempts logged after byte ``start`` of ``log``."""
    lines = new_lines(log, start)
    if lines:
        raise SubprocessNetworkError(_message(lines))


def _message(lines: list[str]) -> str:
    listed = "\n".join(f"  {line}" for line in lines)
    return f"a subprocess tried to reach the network (LoRIS must work offline):\n{listed}"


def _size(log: Path) -> int:
    try:
        return log.stat().st_size
    except FileNotFoundError:
        return 0


def pytest_configure(config: pytest.Config) -> None:
    """Turns the guard on for every Python process started from now on, with a fresh log."""
    fd, log = tempfile.mkstemp(prefix="loris-netguard-", suffix=".log")
    os.close(fd)
    config.stash[_GUARD] = _Guard(Path(log), {k: os.environ.get(k) for k in (SWITCH, LOG, "PYTHONPATH")})
    os.environ.update({SWITCH: "1", LOG: log, "PYTHONPATH": _with_site(os.environ.get("PYTHONPATH"))})


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    """Keeps ``--doctest-modules`` from importing netguard_site/, whose import would hook this process too."""
    return True if collection_path == SITE or SITE in collection_path.parents else None


def pytest_unconfigure(config: pytest.Config) -> None:
    """Puts the environment back (a nested session, as pytester runs, must leave its parent's guard on)."""
    guard = config.stash.get(_GUARD, None)
    if guard is None:
        return
    for key, value in guard.saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    guard.log.unlink(missing_ok=True)


def _watch(item: pytest.Item) -> Generator[None, object, object]:
    """Fails the phase of ``item`` it wraps if a subprocess logged an attempt meanwhile (a phase that failed
    anyway keeps its own error; the terminal summary lists the attempts)."""
    log = item.config.stash[_GUARD].log
    start = _size(log)
    result = yield
    lines = new_lines(log, start)
    if lines:
        pytest.fail(_message(lines), pytrace=False)  # the message says it all; the plugin's frames would only hide it
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _watch(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _watch(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _watch(item))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Lists every attempt of the session, also those outside a test (collection, a process left running)."""
    lines = new_lines(config.stash[_GUARD].log, 0)
    if lines:
        terminalreporter.section("network guard: subprocesses that tried to reach the network", red=True)
        terminalreporter.line("\n".join(lines))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A session whose tests all passed still fails if a subprocess logged an attempt outside any test."""
    if session.exitstatus == pytest.ExitCode.OK and new_lines(session.config.stash[_GUARD].log, 0):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
