import socket

import pytest


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
