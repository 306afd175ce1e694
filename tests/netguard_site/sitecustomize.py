"""The test suite's network guard for subprocesses: tests/network_guard.py puts this folder first on
``PYTHONPATH`` and sets ``LORIS_NETGUARD=1``, so every Python process a test starts (the CLI, torchrun's
workers, Ray's processes) runs this at start-up and refuses, with :class:`NetworkGuardError`, connections and
name lookups of hosts off the machine: anything but loopback, AF_UNIX and this machine's own addresses (which
Ray on Linux serves on). Each refusal appends one line (pid, ``argv[0]``, event, host) to the file named by
``LORIS_NETGUARD_LOG``, so that the test fails even when the process swallowed the error.

Without ``LORIS_NETGUARD=1`` it installs nothing. Not covered: processes started with ``-I``, ``-S`` or ``-E``
or without the inherited ``PYTHONPATH``, programs that are not Python, and sockets opened by C/C++ code
(gRPC in Ray's core, torch's c10d store), which raise no audit event; under ``net.ipv4.ip_nonlocal_bind=1``
every address binds, so every address counts as this machine's. A ``sitecustomize`` further along
``sys.path`` (a distribution's, coverage's), which this one shadows, still runs: :func:`_chain` runs it.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing stays unimported: every subprocess of the suite pays for what this imports
if TYPE_CHECKING:
    from typing import Any

_SWITCH, _LOG = "LORIS_NETGUARD", "LORIS_NETGUARD_LOG"
# lookups name the host first (getnameinfo in a sockaddr); the others pass (socket, address)
_REVERSE = frozenset({"socket.gethostbyaddr", "socket.getnameinfo"})  # may ask DNS even for this machine's address
_LOOKUPS = _REVERSE | {"socket.getaddrinfo", "socket.gethostbyname"}
_EVENTS = _LOOKUPS | {"socket.connect", "socket.sendto", "socket.sendmsg"}
_LOCAL_NAMES = frozenset({"", "localhost", "127.0.0.1", "::1"})
_OWN: dict[str, bool] = {}  # address -> whether this machine's interfaces have it (_binds)
_NAME: list[str] = []  # this machine's name, once asked (_hostname)


class NetworkGuardError(ConnectionRefusedError):
    """A non-local connection or name lookup in a process under the LoRIS test suite's network guard."""


def _target(event: str, args: tuple) -> object:
    """The host ``event`` reaches, or None for sockets that are not IP (AF_UNIX, netlink) or have no address."""
    if event == "socket.getnameinfo":
        return args[0][0]
    if event in _LOOKUPS:
        return args[0]
    sock, address = args[0], args[1]
    sockets = sys.modules["_socket"]  # loaded: only the socket module raises these events
    if sock.family not in (sockets.AF_INET, sockets.AF_INET6) or not isinstance(address, tuple):
        return None
    return address[0]


def _is_local(host: object, sock: Any = None, own: bool = True) -> bool:
    """Loopback, the wildcard address (Linux connects it to this machine), 'localhost', no host at all, and
    if ``own``, this machine's own addresses unless ``sock`` may broadcast (:func:`_binds`)."""
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str) or host in _LOCAL_NAMES:
        return True
    if host.endswith(".localhost") or host == _hostname():
        return True
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a name that needs a resolver
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if ip.is_loopback or ip.is_unspecified:
        return True
    return own and not ip.is_multicast and not _broadcasts(sock) and _binds(str(ip), ip.version)


def _hostname() -> str:
    """This machine's name, which /etc/hosts or nss-myhostname answer (torchrun asks ``socket.getfqdn()``)."""
    if not _NAME:
        _NAME.append(sys.modules["_socket"].gethostname())
    return _NAME[0]


def _broadcasts(sock: Any) -> bool:
    """Whether ``sock`` may send broadcasts, which a subnet's broadcast address (it binds) carries off the machine."""
    if sock is None:
        return False
    sockets = sys.modules["_socket"]
    return bool(sock.getsockopt(sockets.SOL_SOCKET, sockets.SO_BROADCAST))


def _binds(address: str, version: int) -> bool:
    """Whether ``address`` is this machine's (a socket binds to it), cached: Ray on Linux serves on the node's
    interface address, not on loopback, and traffic to it stays on the machine."""
    if address not in _OWN:
        sockets = sys.modules["_socket"]
        probe = sockets.socket(sockets.AF_INET6 if version == 6 else sockets.AF_INET, sockets.SOCK_DGRAM)
        try:
            probe.bind((address, 0))
            _OWN[address] = True
        except OSError:
            _OWN[address] = False
        finally:
            probe.close()
    return _OWN[address]


def _record(event: str, host: object) -> None:
    """One line in the guard's log, written in one append so that concurrent processes do not interleave;
    the plugin creates the log, so a process outliving the session writes nowhere."""
    path = os.environ.get(_LOG)
    if not path:
        return
    argv0 = (getattr(sys, "argv", None) or ["?"])[0]
    line = f"pid {os.getpid()}\t{argv0}\t{event}\t{host!r}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode(errors="replace"))
        finally:
            os.close(fd)
    except OSError:
        pass  # an unwritable log must not change what the process does; the error below still fires


def _hook(event: str, args: tuple) -> None:
    """The audit hook: sees every event of the process, so anything but the socket events returns at once."""
    if event not in _EVENTS:
        return
    try:
        host = _target(event, args)
        if _is_local(host, None if event in _LOOKUPS else args[0], own=event not in _REVERSE):
            return
    except Exception:  # an address form not known here: the socket call itself judges it
        return
    _record(event, host)
    raise NetworkGuardError(f"LoRIS network guard: {event} to {host!r} refused in pid {os.getpid()}: tests run offline")


def _chain() -> None:
    """Runs the next ``sitecustomize`` on ``sys.path`` (after this folder), which this one shadows, as ``site``
    would have."""
    try:
        import importlib.util
        from importlib.machinery import PathFinder

        here = os.path.realpath(os.path.dirname(__file__))
        folders = [os.path.realpath(p or os.curdir) for p in sys.path]
        if here not in folders:
            return  # not imported by site from sys.path: nothing shadowed
        spec = PathFinder.find_spec("sitecustomize", sys.path[folders.index(here) + 1 :])
        if spec is None or spec.loader is None or spec.origin is None or os.path.samefile(spec.origin, __file__):
            return
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as e:  # as site.py treats a failing sitecustomize: a warning, start-up goes on
        print(f"Error in sitecustomize chained by the LoRIS network guard: {e!r}", file=sys.stderr)


try:
    if os.environ.get(_SWITCH) == "1":
        sys.addaudithook(_hook)
except Exception:  # never stop an interpreter from starting (an earlier hook may refuse new hooks)
    pass
_chain()
