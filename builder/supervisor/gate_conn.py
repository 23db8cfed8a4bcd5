"""One client connection of the gate (supervisor/gate.py): reading its
requests, authorizing them, refusing what the limits forbid, reading request
bodies, and the access log. Forwarding to ollama is gate_proxy.py's."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from .gate_http import (
    BLOB_ROUTE, BUFFER, CHUNK_LINE, MiB, HttpError, Request, _bearer, _Closed, _ClientGone, _error_response,
    _read_head, _Reader, _strip_eol, _Timeout, _validate, log, needs_admin, route_of,
)
from .gate_proxy import _Proxy
from .keys import KeysFileError

if TYPE_CHECKING:
    from .gate import Gate


# -- one client connection ----------------------------------------------------------


class _Connection(_Proxy):
    def __init__(self, gate: "Gate", sock: socket.socket, address):
        self.gate = gate
        self.limits = gate.limits
        self.sock = sock
        self.peer = address[0] if isinstance(address, tuple) else "-"
        if self.peer.startswith("::ffff:"):
            self.peer = self.peer[len("::ffff:"):]
        self.reader = _Reader(sock)
        self.sent_head = False
        self.status = 0
        self.bytes_out = 0

    # plumbing

    def _send(self, data: bytes) -> None:
        try:
            self.sock.settimeout(self.limits.write_timeout)
            self.sock.sendall(data)
        except (OSError, ValueError):
            raise _ClientGone() from None
        self.bytes_out += len(data)

    def _refuse(self, error: HttpError) -> None:
        """Answer `error` and end the connection, reading what the client
        still sends for a moment so that it reads the answer (no reset)."""
        self.status = error.status
        try:
            self._send(_error_response(error))
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.limits.drain_seconds
            drained = 0
            while drained < 4 * MiB:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                data = self.sock.recv(BUFFER)
                if not data:
                    break
                drained += len(data)
        except (OSError, _ClientGone):
            pass

    def run(self) -> None:
        try:
            first = True
            while not self.gate.stopping.is_set():
                request = self._read_request(first)
                if request is None or not self._handle(request):
                    return
                first = False
        except (_Closed, _ClientGone, _Timeout, OSError):
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    def _read_request(self, first: bool) -> Request | None:
        limits = self.limits
        if not self.reader.buf:
            wait = limits.header_timeout if first else limits.idle_timeout
            try:
                if not self.reader.fill(time.monotonic() + wait):
                    return None
            except _Closed:
                return None
            except _Timeout:
                if first:  # a connection that says nothing: slowloris or a port scan
                    self._refuse(HttpError(408, "request timeout: no request head within "
                                                f"{limits.header_timeout:g} s"))
                return None
        deadline = time.monotonic() + limits.header_timeout
        self.status, self.bytes_out, self.sent_head = 0, 0, False
        try:
            head = _read_head(self.reader, limits, deadline,
                              HttpError(414, f"URI too long: the request line is over {limits.max_line} bytes"),
                              HttpError(431, f"request header fields too large: over {limits.max_line} bytes a line, "
                                             f"{limits.max_head} bytes or {limits.max_headers} lines in all"))
            if head is None:
                return None
            return _validate(*head)
        except HttpError as error:
            self._refuse(error)
            self._access("-", "-", "-")
            return None
        except _Timeout:
            self._refuse(HttpError(408, f"request timeout: the request head took over {limits.header_timeout:g} s"))
            self._access("-", "-", "-")
            return None

    def _access(self, name: str, method: str, target: str, started: float | None = None, note: str = "") -> None:
        if not self.gate.access_log:
            return
        path = target.split("?", 1)[0]
        took = f" {time.monotonic() - started:.3f}s" if started is not None else ""
        log(f"{self.peer} {name} {method} {path} {self.status or '-'} {self.bytes_out}{took}{' ' + note if note else ''}")

    # one request

    def _handle(self, request: Request) -> bool:
        """Forward one request; whether the connection may serve another."""
        started = time.monotonic()
        name = "-"
        try:
            key = self._authorize(request)
            name = key.name
            route = route_of(request.target)
            if needs_admin(route) and not key.admin:
                raise HttpError(403, f"forbidden: the key {key.name!r} may not change the model store "
                                     f"({request.method} {route} needs an admin key)")
            limit = self.limits.max_blob_body if route == BLOB_ROUTE or route.startswith(BLOB_ROUTE + "/") \
                else self.limits.max_body
            if limit is not None and request.length is not None and request.length > limit:
                raise HttpError(413, f"request body too large: {request.length} bytes; the limit is {limit} bytes")
            keep = self._forward(request, limit, route, key.admin)
        except HttpError as error:
            if not self.sent_head:  # else too late for an answer of our own: the response is cut short
                self._refuse(error)
            keep = False
        except (_ClientGone, _Closed):
            self._access(name, request.method, request.target, started, "client hung up")
            raise
        self._access(name, request.method, request.target, started, getattr(self, "note", ""))
        self.note = ""
        return keep and not request.close and not self.gate.stopping.is_set()

    def _authorize(self, request: Request):
        token = _bearer(request.headers)
        challenge = (("WWW-Authenticate", "Bearer"),)
        if token is None:
            raise HttpError(401, "unauthorized: an API key is required (Authorization: Bearer KEY)", challenge)
        try:
            key = self.gate.keys.authenticate(token)
        except KeysFileError:
            raise HttpError(503, "the gate's keys file is unusable; see the gate's log") from None
        if key is None:
            raise HttpError(401, "unauthorized: invalid API key", challenge)
        return key


    def _body(self, request: Request, limit: int | None):
        """The request body's bytes as they arrive (chunked framing removed);
        HttpError for a malformed, oversized or stalled one, _Closed when the
        client leaves before its end."""
        idle = self.limits.idle_timeout
        reader = self.reader
        try:
            if not request.chunked:
                left = request.length or 0
                while left:
                    data = reader.read_some(min(left, BUFFER), time.monotonic() + idle)
                    left -= len(data)
                    yield data
                return
            total = 0
            bad = HttpError(400, "bad request: malformed chunked body")
            while True:
                line = reader.readline(self.limits.max_line, time.monotonic() + idle, bad)
                if line is None:
                    raise _Closed()
                match = CHUNK_LINE.match(_strip_eol(line))
                if not match:
                    raise bad
                size = int(match.group(1), 16)
                if size == 0:
                    trailer_bytes = 0
                    while True:  # trailers: read and dropped
                        line = reader.readline(self.limits.max_line, time.monotonic() + idle, bad)
                        if line is None:
                            raise _Closed()
                        trailer_bytes += len(line)
                        if trailer_bytes > self.limits.max_head:
                            raise bad
                        if line in (b"\r\n", b"\n"):
                            return
                total += size
                if limit is not None and total > limit:
                    raise HttpError(413, f"request body too large: over {limit} bytes")
                left = size
                while left:
                    data = reader.read_some(min(left, BUFFER), time.monotonic() + idle)
                    left -= len(data)
                    yield data
                if reader.read_exact(2, time.monotonic() + idle) != b"\r\n":
                    raise bad
        except _Timeout:
            raise HttpError(408, f"request timeout: no body bytes for {idle:g} s") from None
