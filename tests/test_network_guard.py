import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import network_guard
import pytest

# pytester runs a nested session with the plugin (test_plugin_fails_a_test_whose_subprocess_swallowed_a_refusal)
pytest_plugins = ["pytester"]

# a subprocess that swallows the guard's refusal and exits 0
PROBE = "import socket\ntry:\n    socket.socket().connect(('169.254.169.254', 80))\nexcept OSError:\n    pass"


def test_public_connection_is_refused() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(RuntimeError, match="offline"):
            s.connect(("93.184.216.34", 80))
    finally:
        s.close()


def test_dns_lookup_is_refused() -> None:
    with pytest.raises(RuntimeError, match="offline"):
        socket.getaddrinfo("pypi.org", 443)


def test_loopback_is_allowed() -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        cli.connect(srv.getsockname())
    finally:
        cli.close()
        srv.close()


def test_guard_is_a_plugin_so_doctests_are_covered(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("network_guard")


# --- subprocesses: tests/netguard_site/sitecustomize.py, switched on by the plugin ----------------------


def _python(code: str, log: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with the environment the plugin set up, the guard's log at ``log``."""
    if log.parent.is_dir():
        log.touch()  # as the plugin does: the guard appends to a log, it creates none
    full = {**os.environ, network_guard.LOG: str(log), **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=60)


def test_plugin_switches_the_guard_on_for_subprocesses() -> None:
    assert os.environ[network_guard.SWITCH] == "1"
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(network_guard.SITE)
    assert Path(os.environ[network_guard.LOG]).is_file()


def test_subprocess_connection_is_refused_and_logged(tmp_path: Path) -> None:
    log = tmp_path / "guard.log"
    done = _python("import socket; socket.create_connection(('169.254.169.254', 80), timeout=1)", log)
    assert done.returncode != 0 and "NetworkGuardError: LoRIS network guard" in done.stderr, done.stderr
    (line,) = log.read_text().splitlines()
    assert line.startswith("pid ") and "\t-c\t" in line and line.endswith("'169.254.169.254'")


def test_swallowed_connect_is_still_logged(tmp_path: Path) -> None:
    log = tmp_path / "guard.log"
    code = "import socket\ntry:\n    socket.socket().connect(('169.254.169.254', 80))\nexcept OSError:\n    pass"
    assert _python(code, log).returncode == 0
    assert log.read_text().splitlines()[0].endswith("\tsocket.connect\t'169.254.169.254'")


def test_subprocess_loopback_and_unix_sockets_work(tmp_path: Path) -> None:
    log = tmp_path / "guard.log"
    code = f"""import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(srv.getsockname(), timeout=5)
conn, _ = srv.accept()
cli.sendall(b"ping")
assert conn.recv(4) == b"ping"
socket.getaddrinfo("localhost", 80)
unix = socket.socket(socket.AF_UNIX)
unix.bind({str(tmp_path / "s")!r})
unix.listen(1)
socket.socket(socket.AF_UNIX).connect({str(tmp_path / "s")!r})
try:
    socket.getaddrinfo("169.254.169.254", 80)  # a numeric host: no traffic, refused all the same
except ConnectionRefusedError:
    print(sys.modules["sitecustomize"].__file__)
"""
    done = _python(code, log)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(network_guard.SITE / "sitecustomize.py")
    (line,) = log.read_text().splitlines()  # the refused numeric lookup only
    assert line.endswith("\tsocket.getaddrinfo\t'169.254.169.254'")


def test_subprocess_metadata_lookup_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "guard.log"
    code = "import socket\ntry:\n    socket.getaddrinfo('metadata.google.internal', 80)\n"
    code += "except ConnectionRefusedError as e:\n    print(e)"
    done = _python(code, log)
    assert done.returncode == 0 and "LoRIS network guard" in done.stdout and "metadata.google.internal" in done.stdout
    assert log.read_text().splitlines()[0].endswith("\tsocket.getaddrinfo\t'metadata.google.internal'")


def test_guard_is_off_without_the_switch_and_survives_an_unwritable_log(tmp_path: Path) -> None:
    lookup = "import socket; socket.getaddrinfo('169.254.169.254', 80)"  # numeric: resolves without the network
    assert _python(lookup, tmp_path / "off.log", **{network_guard.SWITCH: "0"}).returncode == 0
    assert (tmp_path / "off.log").read_text() == ""
    done = _python(lookup, tmp_path / "missing" / "guard.log")
    assert done.returncode != 0 and "NetworkGuardError" in done.stderr and not (tmp_path / "missing").exists()


def test_guarded_env_keeps_the_guard_in_an_environment_built_from_scratch(tmp_path: Path) -> None:
    env = network_guard.guarded_env({"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path)})
    assert env["PYTHONPATH"] == os.pathsep.join([str(network_guard.SITE), str(tmp_path)])
    assert env[network_guard.SWITCH] == "1" and env[network_guard.LOG] == os.environ[network_guard.LOG]
    env[network_guard.LOG] = str(tmp_path / "guard.log")  # this refusal is expected: not in the session's log
    (tmp_path / "guard.log").touch()
    code = "import socket; socket.getaddrinfo('169.254.169.254', 80)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "NetworkGuardError" in done.stderr
    assert (tmp_path / "guard.log").read_text().count("\n") == 1


@pytest.fixture
def netguard_site(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The subprocesses' sitecustomize, imported here with its switch off: no audit hook in this process."""
    monkeypatch.setenv(network_guard.SWITCH, "0")
    spec = importlib.util.spec_from_file_location("netguard_site_under_test", network_guard.SITE / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_this_machines_own_addresses_are_local_unless_broadcast(netguard_site: ModuleType) -> None:
    local = netguard_site._is_local
    netguard_site._OWN["203.0.113.7"] = True  # as if an interface of this machine had it (Ray serves on the node's)
    assert local("203.0.113.7") and not local("169.254.169.254")  # the metadata server's binds nowhere here
    assert not local("203.0.113.7", own=False)  # a reverse lookup of it may still ask DNS
    assert local(socket.gethostname(), own=False)  # torchrun looks its machine up: socket.getfqdn()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        assert not local("203.0.113.7", udp)  # a subnet's broadcast address binds too
    assert not local("224.0.0.1") and not local("metadata.google.internal")
    assert all(local(h) for h in (None, b"localhost", "127.0.0.2", "::ffff:127.0.0.1", "0.0.0.0", ""))


def test_a_sitecustomize_further_along_the_path_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("print('the next sitecustomize ran')\n")
    pythonpath = os.pathsep.join([os.environ["PYTHONPATH"], str(tmp_path)])
    done = _python(
        "import sys; print(sys.modules['sitecustomize'].__file__)", tmp_path / "guard.log", PYTHONPATH=pythonpath
    )
    assert done.stdout.splitlines() == ["the next sitecustomize ran", str(network_guard.SITE / "sitecustomize.py")]


def test_check_log_lists_the_attempts_after_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "guard.log"
    network_guard.check_log(log)  # no log yet: nothing to report
    log.write_text("pid 1\t-c\tsocket.connect\t'169.254.169.254'\n")
    network_guard.check_log(log, start=log.stat().st_size)
    with pytest.raises(network_guard.SubprocessNetworkError, match="offline(.|\n)*'169.254.169.254'"):
        network_guard.check_log(log)


def test_plugin_fails_a_test_whose_subprocess_swallowed_a_refusal(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner=f"""
        import subprocess, sys

        PROBE = {PROBE!r}

        def test_quiet_probe():
            assert subprocess.run([sys.executable, "-c", PROBE]).returncode == 0

        def test_offline():
            assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0
        """
    )
    before = os.environ[network_guard.LOG]
    result = pytester.runpytest_inprocess("-p", "network_guard", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*tried to reach the network*", "*socket.connect*'169.254.169.254'*"])
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_quiet_probe*"])
    assert os.environ[network_guard.LOG] == before  # the nested session gave the outer one its guard back


def test_plugin_fails_a_session_whose_subprocess_probed_outside_any_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner=f"""
        import subprocess, sys

        subprocess.run([sys.executable, "-c", {PROBE!r}], check=True)  # while the module is collected

        def test_nothing():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "network_guard", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*network guard: subprocesses that tried to reach the network*", "*169.254.169.254*"])
