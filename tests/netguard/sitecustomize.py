"""The tests' network guard: no test traffic leaves loopback.

Loaded by Python at start (``site`` imports ``sitecustomize`` from
``sys.path``): ``tests/conftest.py`` puts this folder first on ``PYTHONPATH``
for every process the tests start, and calls :func:`install` in pytest's own
process. From then on the process refuses

* ``socket.connect``/``connect_ex`` to an IP address outside loopback
  (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104), or to a host name other than
  ``localhost``;
* ``socket.getaddrinfo``/``gethostbyname`` of a host name other than
  ``localhost`` (a DNS lookup is traffic too); IP literals are not looked up
  and pass to ``connect``, which decides.

A refused connect raises ``PermissionError``, a refused lookup
``socket.gaierror`` (EAI_NONAME, as an unknown name does); either message
starts with ``netguard:`` and names the address. A refusal also appends one JSON line to ``$TESTS_NETGUARD_LOG``
(when set): the conftest fails the test during which any process wrote one,
even when the code under test swallowed the error. Unix sockets (the Docker
engine) are left alone.

What it does not see: programs that are not Python (docker, Compose, apt,
mmdebstrap, the compiler) and Python inside containers. Package registries
are reached only by their own clients (pip in the fixtures runs without this
guard on purpose).

Standard library only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys

LOG_ENV = "TESTS_NETGUARD_LOG"
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _is_local_host(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.strip().rstrip(".").lower()
    if name in ("", *_LOCAL_NAMES) or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0].strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _is_literal(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0].strip("[]"))
    except ValueError:
        return False
    return True


def _refuse(kind: str, target: str) -> None:
    message = f"netguard: refused {kind} {target}: tests may reach only loopback (see tests/netguard/sitecustomize.py)"
    _record(kind, target)
    if kind == "name lookup of":
        raise socket.gaierror(socket.EAI_NONAME, message)
    raise PermissionError(message)


def _record(kind: str, target: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as log:
                log.write(json.dumps({"pid": os.getpid(), "argv": sys.argv, "kind": kind, "target": target}) + "\n")
        except OSError:
            pass


def _check_address(sock: socket.socket, address: object) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    if not isinstance(address, tuple) or not address:
        return
    host, port = address[0], (address[1] if len(address) > 1 else "?")
    if not _is_local_host(host):
        _refuse("connect to", f"{host}:{port}")


def install() -> None:
    """Wrap the socket functions of this process (idempotent)."""
    if getattr(socket, "_netguard_installed", False):
        return
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo
    real_gethostbyname = socket.gethostbyname
    real_gethostbyname_ex = socket.gethostbyname_ex

    def connect(self, address):  # type: ignore[no-untyped-def]
        _check_address(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):  # type: ignore[no-untyped-def]
        _check_address(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not _is_local_host(host) and not _is_literal(host):
            _refuse("name lookup of", str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host):  # type: ignore[no-untyped-def]
        if not _is_local_host(host) and not _is_literal(host):
            _refuse("name lookup of", str(host))
        return real_gethostbyname(host)

    def gethostbyname_ex(host):  # type: ignore[no-untyped-def]
        if not _is_local_host(host) and not _is_literal(host):
            _refuse("name lookup of", str(host))
        return real_gethostbyname_ex(host)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex
    socket._netguard_installed = True  # type: ignore[attr-defined]


install()
