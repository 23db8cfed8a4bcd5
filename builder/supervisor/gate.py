"""The gate: an authenticating reverse proxy in front of ollama (issue 31).

ollama has no authentication; the gate listens where users reach the model
and forwards to ollama on loopback:

* every request needs `Authorization: Bearer KEY` with a key from the keys
  file (supervisor/keys.py); a missing or wrong key gets 401 with ollama's
  error shape `{"error": "..."}` and `WWW-Authenticate: Bearer`;
* the routes that change the model store (/api/create, /api/delete,
  /api/copy, /api/pull, /api/push, /api/blobs/*, and the account routes of
  ollama 0.12+: /api/me, /api/signout, /api/user/keys/*, and
  /api/experimental/web_search|web_fetch, which spend the signed-in
  account) need an admin key, whatever the method (403 otherwise). The
  route is decided on the path as ollama's router sees it and then some
  (percent-decoded, lower-cased, slashes and dot segments collapsed), so
  `/api/%64elete` or `/API//delete` cannot slip through; everything else
  (inference, tags, show, ps, version, /v1/*, unknown routes) is forwarded
  with any valid key;
* responses stream through as they arrive (each piece ollama sends is
  written to the client at once: NDJSON and /v1 SSE alike); a client that
  hangs up (even while ollama is still reading the prompt or loading) makes
  the gate close its connection to ollama at once, which is how ollama
  learns that a direct client went away (Go cancels the request's context:
  the runner drops the sequence, the model stays loaded);
* one fresh upstream connection per request (`Connection: close`), with a
  request head the gate writes itself: only what the gate parsed reaches
  ollama, framed by the gate, so no request can be smuggled behind another.
  `Host` is rewritten to the upstream address (ollama bound to loopback
  answers 403 to any other host name: allowedHostsMiddleware), the key is
  not forwarded, `X-Forwarded-For` is the client's address.

Limits (Limits below; each ends in a clean 4xx and a closed connection, and
the gate goes on serving the others): request line 8 KiB (414), a header
line 8 KiB, the head 64 KiB, 100 header lines (431), the whole head within
10 s of the connection (or of its first byte on a kept-alive connection; 408
and close), a body over 64 MiB (413; /api/blobs uploads, admin only, have
no limit: they are the model itself, 100+ GB), Transfer-Encoding together
with Content-Length, differing Content-Lengths, a transfer coding other than
chunked, Transfer-Encoding in HTTP/1.0, obsolete line folding, a space
before a header's colon, control characters, absolute-form targets (400),
versions other than HTTP/1.0 and 1.1 (505). An HTTP/1.0 client gets its
response close-delimited (no chunked). A request the gate refuses closes the
connection (after a short drain so the client reads the answer).

Standard library only, Python 3.10+: it runs inside the image and on an
AutoDL instance's own python3. It never consults proxy variables (raw
sockets), and its upstream must be a loopback address. It logs one line a
request (client address, key name, method, path without query, status,
bytes, seconds): never a key, a prompt or an answer.

    python3 -m supervisor.gate --listen HOST:PORT --upstream 127.0.0.1:PORT --keys FILE
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass

from .keys import KeysFileError, KeyStore

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_line: int = 8 * 1024  # request line (414) and each header line (431)
    max_head: int = 64 * 1024  # the whole request head (431)
    max_headers: int = 100  # header lines (431)
    max_body: int | None = 64 * MiB  # a request body, except blob uploads (413)
    max_blob_body: int | None = None  # /api/blobs/* (admin only): the model itself, no limit
    header_timeout: float = 10.0  # the whole head, from the connection or its first byte (408, close)
    idle_timeout: float = 60.0  # a kept-alive connection between requests; each read of a body
    write_timeout: float = 120.0  # a client that stops reading a response
    connect_timeout: float = 5.0  # connecting to ollama (502)
    max_connections: int = 512  # more get 503 and are closed
    drain_seconds: float = 2.0  # reading what a refused client still sends, so it reads the answer


# Routes that change the store or the account: an admin key, any method.
ADMIN_ROUTES = (
    "/api/create", "/api/delete", "/api/copy", "/api/pull", "/api/push", "/api/blobs",
    "/api/me", "/api/signin", "/api/signout", "/api/user/keys",
    "/api/experimental/web_search", "/api/experimental/web_fetch",
)
BLOB_ROUTE = "/api/blobs"
# Hop-by-hop (RFC 9110 7.6.1) and the headers the gate writes itself.
REQUEST_DROP = frozenset({
    "host", "authorization", "proxy-authorization", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length", "expect", "x-forwarded-for", "forwarded",
})
RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate",
})
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
TARGET = re.compile(rb"/[\x21-\x7e]*\Z")
VERSION = re.compile(rb"HTTP/(\d)\.(\d)\Z")
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9]\d\d)(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?\Z")
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?\Z")
DIGITS = re.compile(r"[0-9]{1,18}\Z")
REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 408: "Request Timeout", 413: "Content Too Large",
    414: "URI Too Long", 417: "Expectation Failed", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
BUFFER = 64 * 1024
UPSTREAM_LIMITS = Limits(max_line=64 * 1024, max_head=256 * 1024, max_headers=200)  # ollama's answers

_LOG_LOCK = threading.Lock()


def log(message: str) -> None:
    with _LOG_LOCK:
        print(f"gate: {message}", flush=True)


class HttpError(Exception):
    """A request the gate answers itself (and then closes the connection)."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class _Timeout(Exception):
    pass


class _Closed(Exception):
    """The peer closed (or reset) the connection."""


class _ClientGone(Exception):
    """The client hung up while its request was with ollama."""


class _BadUpstream(Exception):
    """ollama's answer could not be read (it closed early or spoke nonsense)."""


# -- reading --------------------------------------------------------------------


class _Reader:
    """Buffered reads from a socket. `wait(deadline)` is called before each
    receive (the upstream side watches the client meanwhile); without it the
    socket's timeout carries the deadline."""

    def __init__(self, sock: socket.socket, wait=None):
        self.sock = sock
        self.buf = bytearray()
        self.wait = wait

    def fill(self, deadline: float | None) -> bool:
        """Receive more; False at end of file."""
        if self.wait is not None:
            self.wait()
            timeout = None
        elif deadline is None:
            timeout = None
        else:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise _Timeout()
        try:
            if self.wait is None:
                self.sock.settimeout(timeout)
            data = self.sock.recv(BUFFER)
        except socket.timeout:
            raise _Timeout() from None
        except (ConnectionError, OSError):
            raise _Closed() from None
        if not data:
            return False
        self.buf += data
        return True

    def readline(self, limit: int, deadline: float | None, too_long: Exception) -> bytes | None:
        """One line with its end; None at a clean end of file before any byte."""
        start = 0
        while True:
            end = self.buf.find(b"\n", start)
            if end >= 0:
                if end + 1 > limit:
                    raise too_long
                line = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return line
            if len(self.buf) > limit:
                raise too_long
            start = len(self.buf)
            if not self.fill(deadline):
                if self.buf:
                    raise _Closed()
                return None

    def read_some(self, most: int, deadline: float | None) -> bytes:
        """Between 1 and `most` bytes (what is buffered first); _Closed at end of file."""
        if not self.buf and not self.fill(deadline):
            raise _Closed()
        data = bytes(self.buf[:most])
        del self.buf[:most]
        return data

    def read_exact(self, count: int, deadline: float | None) -> bytes:
        while len(self.buf) < count:
            if not self.fill(deadline):
                raise _Closed()
        data = bytes(self.buf[:count])
        del self.buf[:count]
        return data


def _strip_eol(line: bytes) -> bytes:
    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if b"\r" in line or b"\x00" in line:
        raise HttpError(400, "bad request: a bare CR or NUL in the request head")
    return line


def _parse_header(raw: bytes) -> tuple[str, str]:
    line = _strip_eol(raw)
    if line[:1] in (b" ", b"\t"):
        raise HttpError(400, "bad request: obsolete line folding in a header")
    name, colon, value = line.partition(b":")
    if not colon or not TOKEN.match(name):
        raise HttpError(400, "bad request: a malformed header line")
    value = value.strip(b" \t")
    if CTL.search(value):
        raise HttpError(400, "bad request: a control character in a header value")
    return name.decode("ascii"), value.decode("latin-1")


def _read_head(reader: _Reader, limits: Limits, deadline: float | None, line_error: Exception,
               header_error: Exception) -> tuple[bytes, list[tuple[str, str]]] | None:
    """The start line and the header lines; None at a clean end of file first."""
    for _ in range(4):  # RFC 9112 2.2: empty lines before a request line may be ignored
        line = reader.readline(limits.max_line, deadline, line_error)
        if line is None:
            return None
        if line not in (b"\r\n", b"\n"):
            break
    else:
        raise HttpError(400, "bad request: no request line")
    total = len(line)
    start = _strip_eol(line)
    headers: list[tuple[str, str]] = []
    while True:
        raw = reader.readline(limits.max_line, deadline, header_error)
        if raw is None:
            raise _Closed()
        total += len(raw)
        if total > limits.max_head:
            raise header_error
        if raw in (b"\r\n", b"\n"):
            return start, headers
        if len(headers) >= limits.max_headers:
            raise header_error
        headers.append(_parse_header(raw))


def _values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


def route_of(target: str) -> str:
    """The path a router could make of `target`, and more: percent-decoded
    (repeatedly), lower-cased, empty and dot segments removed. Used only to
    decide whether a route needs an admin key (it is never forwarded)."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    for _ in range(4):
        decoded = urllib.parse.unquote(path, errors="surrogateescape")
        if decoded == path:
            break
        path = decoded
    parts: list[str] = []
    for segment in path.lower().replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if parts:
                parts.pop()
            continue
        parts.append(segment)
    return "/" + "/".join(parts)


def needs_admin(route: str) -> bool:
    return any(route == r or route.startswith(r + "/") for r in ADMIN_ROUTES)


@dataclass
class Request:
    method: str
    target: str
    minor: int  # HTTP/1.<minor>
    headers: list[tuple[str, str]]
    length: int | None  # Content-Length, or None
    chunked: bool
    close: bool  # the client wants the connection closed afterwards
    expect_continue: bool

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


def _validate(start: bytes, headers: list[tuple[str, str]]) -> Request:
    parts = start.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise HttpError(400, "bad request: malformed request line")
    method, target, version = parts
    match = VERSION.match(version)
    if not match:
        raise HttpError(400, "bad request: malformed HTTP version")
    if match.group(1) != b"1" or match.group(2) not in (b"0", b"1"):
        raise HttpError(505, "HTTP version not supported: use HTTP/1.1 or HTTP/1.0")
    minor = int(match.group(2))
    if not TOKEN.match(method):
        raise HttpError(400, "bad request: malformed method")
    if method == b"CONNECT":
        raise HttpError(400, "bad request: CONNECT is not supported")
    if not TARGET.match(target):
        raise HttpError(400, "bad request: the request target must be a path (origin-form)")
    hosts = _values(headers, "host")
    if len(hosts) > 1 or (minor == 1 and not hosts):
        raise HttpError(400, "bad request: exactly one Host header is required")
    encodings = _values(headers, "transfer-encoding")
    lengths = _values(headers, "content-length")
    chunked = False
    if encodings:
        if minor == 0:
            raise HttpError(400, "bad request: Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise HttpError(400, "bad request: both Transfer-Encoding and Content-Length")
        if len(encodings) != 1 or encodings[0].strip().lower() != "chunked":
            raise HttpError(400, "bad request: the only transfer coding accepted is chunked")
        chunked = True
    length = None
    if lengths:
        values = {v.strip() for value in lengths for v in value.split(",")}
        if len(values) != 1 or not DIGITS.match(next(iter(values))):
            raise HttpError(400, "bad request: invalid or conflicting Content-Length")
        length = int(values.pop())
    tokens = {t.strip().lower() for value in _values(headers, "connection") for t in value.split(",")}
    expect = _values(headers, "expect")
    if expect and (len(expect) != 1 or expect[0].strip().lower() != "100-continue"):
        raise HttpError(417, "expectation failed: only 100-continue is supported")
    return Request(method.decode("ascii"), target.decode("ascii"), minor, headers, length, chunked,
                   close=minor == 0 or "close" in tokens, expect_continue=bool(expect) and minor == 1)


def _bearer(headers: list[tuple[str, str]]) -> str | None:
    values = _values(headers, "authorization")
    if len(values) > 1:
        raise HttpError(400, "bad request: more than one Authorization header")
    if not values:
        return None
    scheme, _, token = values[0].partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def _error_response(error: HttpError, close: bool = True) -> bytes:
    body = json.dumps({"error": error.message}).encode()
    lines = [f"HTTP/1.1 {error.status} {REASONS.get(error.status, 'Error')}",
             "Content-Type: application/json; charset=utf-8", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in error.headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- one client connection ----------------------------------------------------------


class _Connection:
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
            keep = self._forward(request, limit)
        except HttpError as error:
            if not self.sent_head:  # else too late for an answer of our own: the response is cut short
                self._refuse(error)
            keep = False
        except _ClientGone:
            self._access(name, request.method, request.target, started, "client hung up")
            raise
        self._access(name, request.method, request.target, started)
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

    def _forward(self, request: Request, limit: int | None) -> bool:
        gate = self.gate
        try:
            upstream = socket.create_connection(gate.upstream, timeout=self.limits.connect_timeout)
        except OSError:
            raise HttpError(502, f"bad gateway: ollama is not answering on {gate.upstream_text}") from None
        try:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.settimeout(None)
            return self._exchange(request, upstream, limit)
        finally:
            try:
                upstream.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            upstream.close()

    def _exchange(self, request: Request, upstream: socket.socket, limit: int | None) -> bool:
        lines = [f"{request.method} {request.target} HTTP/1.1", f"Host: {self.gate.upstream_text}"]
        tokens = {t.strip().lower() for value in _values(request.headers, "connection") for t in value.split(",")}
        for name, value in request.headers:
            lowered = name.lower()
            if lowered not in REQUEST_DROP and lowered not in tokens:
                lines.append(f"{name}: {value}")
        lines.append(f"X-Forwarded-For: {self.peer}")
        if request.chunked:
            lines.append("Transfer-Encoding: chunked")
        elif request.length is not None:
            lines.append(f"Content-Length: {request.length}")
        lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        state = {"watch": True, "poll": select.poll()}
        state["poll"].register(upstream, select.POLLIN | select.POLLPRI)
        state["poll"].register(self.sock, select.POLLIN | select.POLLPRI)
        pending = bytearray()  # response bytes for the client, written before waiting for more

        def wait() -> None:
            if pending:
                self._send(bytes(pending))
                pending.clear()
            while True:
                for fd, _events in state["poll"].poll():
                    if fd == upstream.fileno():
                        return
                    self._check_client(state)

        up_reader = _Reader(upstream, wait)
        body_complete = True
        try:
            upstream.sendall(head)
            if request.has_body:
                if request.expect_continue:
                    self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
                body_complete = self._relay_body(request, upstream, limit)
        except OSError:  # ollama stopped reading: it may have answered all the same
            body_complete = False
        try:
            keep = self._relay_response(request, up_reader, pending)
        except _BadUpstream:
            if self.sent_head:
                return False
            raise HttpError(502, "bad gateway: ollama closed the connection without a complete answer") from None
        return keep and body_complete

    def _check_client(self, state: dict) -> None:
        """The client's socket is readable while ollama works: end of file
        or an error means it hung up; data (a pipelined request) stops the watch."""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            raise _ClientGone() from None
        if not data:
            raise _ClientGone()
        state["poll"].unregister(self.sock)
        state["watch"] = False

    def _relay_body(self, request: Request, upstream: socket.socket, limit: int | None) -> bool:
        """Copy the request body to ollama as it arrives; HttpError for a bad or oversized one."""
        idle = self.limits.idle_timeout
        reader = self.reader
        try:
            if not request.chunked:
                left = request.length or 0
                while left:
                    data = reader.read_some(min(left, BUFFER), time.monotonic() + idle)
                    left -= len(data)
                    upstream.sendall(data)
                return True
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
                            break
                    upstream.sendall(b"0\r\n\r\n")
                    return True
                total += size
                if limit is not None and total > limit:
                    raise HttpError(413, f"request body too large: over {limit} bytes")
                upstream.sendall(b"%x\r\n" % size)
                left = size
                while left:
                    data = reader.read_some(min(left, BUFFER), time.monotonic() + idle)
                    left -= len(data)
                    upstream.sendall(data)
                if reader.read_exact(2, time.monotonic() + idle) != b"\r\n":
                    raise bad
                upstream.sendall(b"\r\n")
        except _Timeout:
            raise HttpError(408, f"request timeout: no body bytes for {idle:g} s") from None

    def _relay_response(self, request: Request, up: _Reader, pending: bytearray) -> bool:
        bad = _BadUpstream()
        while True:
            try:
                head = _read_head(up, UPSTREAM_LIMITS, None, bad, bad)
            except (HttpError, _Closed):
                raise _BadUpstream() from None
            if head is None:
                raise _BadUpstream()
            match = STATUS_LINE.match(head[0])
            if not match:
                raise _BadUpstream()
            status = int(match.group(1))
            if status == 101:
                raise _BadUpstream()
            if status >= 200:
                break
        reason = (match.group(2) or b"").decode("latin-1")
        headers = head[1]
        encodings = _values(headers, "transfer-encoding")
        lengths = _values(headers, "content-length")
        if request.method == "HEAD" or status in (204, 304):
            framing, length = "none", 0
        elif encodings:
            if [e.strip().lower() for e in encodings] != ["chunked"]:
                raise _BadUpstream()
            framing, length = "chunked", None
        elif lengths:
            values = {v.strip() for value in lengths for v in value.split(",")}
            if len(values) != 1 or not DIGITS.match(next(iter(values))):
                raise _BadUpstream()
            framing, length = "length", int(values.pop())
        else:
            framing, length = "close", None
        client11 = request.minor == 1
        rechunk = framing in ("chunked", "close") and client11
        close = request.close or (framing in ("chunked", "close") and not client11)
        tokens = {t.strip().lower() for value in _values(headers, "connection") for t in value.split(",")}
        lines = [f"HTTP/1.1 {status} {reason}".rstrip()]
        for name, value in headers:
            lowered = name.lower()
            if lowered in RESPONSE_DROP or lowered in tokens:
                continue
            if lowered == "content-length" and framing in ("chunked", "close"):
                continue
            lines.append(f"{name}: {value}")
        if rechunk and request.method != "HEAD" and status not in (204, 304):
            lines.append("Transfer-Encoding: chunked")
        if close:
            lines.append("Connection: close")
        self.status = status
        pending += ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sent_head = True

        def out(data: bytes) -> None:
            if rechunk:
                pending.extend(b"%x\r\n" % len(data))
                pending.extend(data)
                pending.extend(b"\r\n")
            else:
                pending.extend(data)

        try:
            if framing == "length":
                left = length or 0
                while left:
                    data = up.read_some(min(left, BUFFER), None)
                    left -= len(data)
                    out(data)
            elif framing == "chunked":
                while True:
                    line = up.readline(64 * 1024, None, bad)
                    if line is None:
                        raise _BadUpstream()
                    match = CHUNK_LINE.match(line.rstrip(b"\r\n"))
                    if not match:
                        raise _BadUpstream()
                    size = int(match.group(1), 16)
                    if size == 0:
                        while True:  # trailers dropped
                            line = up.readline(64 * 1024, None, bad)
                            if line in (None, b"\r\n", b"\n"):
                                break
                        break
                    left = size
                    while left:
                        data = up.read_some(min(left, BUFFER), None)
                        left -= len(data)
                        out(data)
                    if up.read_exact(2, None) != b"\r\n":
                        raise _BadUpstream()
            elif framing == "close":
                while True:
                    try:
                        data = up.read_some(BUFFER, None)
                    except _Closed:
                        break
                    out(data)
        except _Closed:
            raise _BadUpstream() from None
        if rechunk:
            pending.extend(b"0\r\n\r\n")
        if pending:
            self._send(bytes(pending))
            pending.clear()
        return not close


# -- the server -----------------------------------------------------------------------


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT' (or 'HOST' with a default port) -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise ValueError(f"{text!r}: an IPv6 address needs brackets: [ADDRESS]:PORT")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        port_text = str(default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host or "0.0.0.0", int(port_text)


def _format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _loopback(host: str) -> str:
    """The upstream host as an address; only loopback is accepted."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"upstream {host!r}: must be a loopback address (127.0.0.1 or ::1)") from None
    if not address.is_loopback:
        raise ValueError(f"upstream {host!r}: must be a loopback address (127.0.0.1 or ::1): ollama listens on loopback only")
    return str(address)


class Gate:
    """The listening gate. `start()` binds (returns the bound (host, port));
    `serve()` accepts until `stop()`."""

    def __init__(self, listen_host: str, listen_port: int, upstream_port: int, keys_file: str,
                 limits: Limits | None = None, upstream_host: str = "127.0.0.1", access_log: bool = True):
        self.limits = limits or Limits()
        host = _loopback(upstream_host)
        self.upstream = (host, int(upstream_port))
        self.upstream_text = _format_hostport(host, int(upstream_port))
        self.listen = (listen_host or "0.0.0.0", int(listen_port))
        self.keys = KeyStore(keys_file, on_change=log)
        self.access_log = access_log
        self.stopping = threading.Event()
        self.listener: socket.socket | None = None
        self._active = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def start(self) -> tuple[str, int]:
        host, port = self.listen
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            address = (host, port)
        except ValueError:  # a host name: what it resolves to first
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and ipaddress.ip_address(address[0]).is_unspecified:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # [::] takes IPv4 too
        try:
            listener.bind(address)
            listener.listen(socket.SOMAXCONN)
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"cannot listen on {_format_hostport(host, port)}: {exc.strerror}") from None
        self.listener = listener
        bound = listener.getsockname()
        return bound[0], bound[1]

    def serve(self, stop_event: threading.Event | None = None) -> None:
        assert self.listener is not None, "start() first"
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        try:
            while not self.stopping.is_set() and not (stop_event is not None and stop_event.is_set()):
                if not poller.poll(200):
                    continue
                try:
                    sock, address = self.listener.accept()
                except OSError:
                    continue
                with self._lock:
                    full = self._active >= self.limits.max_connections
                    if not full:
                        self._active += 1
                if full:
                    self._reject(sock)
                    continue
                threading.Thread(target=self._run, args=(sock, address), daemon=True).start()
        finally:
            self.stopping.set()
            self.listener.close()
            with self._idle:  # let the requests in flight finish, a while
                self._idle.wait_for(lambda: self._active == 0, timeout=5.0)

    def stop(self) -> None:
        self.stopping.set()

    def _reject(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(1.0)
            sock.sendall(_error_response(HttpError(503, "the gate is at its connection limit; try again")))
        except OSError:
            pass
        finally:
            sock.close()

    def _run(self, sock: socket.socket, address) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Connection(self, sock, address).run()
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not end the gate
            log(f"internal error on a connection: {type(exc).__name__}")
            try:
                sock.close()
            except OSError:
                pass
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()


def serve_gate(listen_host: str, listen_port: int, upstream_port: int, keys_file: str,
               stop_event: threading.Event | None = None, *, limits: Limits | None = None,
               upstream_host: str = "127.0.0.1", access_log: bool = True, ready=None) -> None:
    """Serve until `stop_event` is set (forever without one). `ready(host, port)`
    is called once listening. Raises KeysFileError (the keys file is missing,
    malformed or readable by others), ValueError (a non-loopback upstream) or
    OSError (cannot listen) before serving."""
    gate = Gate(listen_host, listen_port, upstream_port, keys_file, limits, upstream_host, access_log)
    host, port = gate.start()
    log(f"listening on {_format_hostport(host, port)}, forwarding to ollama on {gate.upstream_text}")
    if ready is not None:
        ready(host, port)
    gate.serve(stop_event)


def _size(text: str) -> int | None:
    """'64M', '2G', '1048576', 'none' -> bytes (None: no limit)."""
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text in ("none", "unlimited", "0"):
        return None
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(text[-1:], 1)
    digits = text[:-1] if scale != 1 else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a size like 64M, 2G or none")
    return int(digits) * scale


def main(argv: list[str] | None = None) -> int:
    defaults = Limits()
    parser = argparse.ArgumentParser(prog="python3 -m supervisor.gate",
                                     description="Authenticating reverse proxy in front of ollama (API keys).")
    parser.add_argument("--listen", required=True, help="HOST:PORT or [IPV6]:PORT to listen on")
    parser.add_argument("--upstream", default="127.0.0.1:11434", help="ollama's loopback HOST:PORT (default %(default)s)")
    parser.add_argument("--keys", required=True, help="the keys file (mode 0600; see supervisor/keys.py)")
    parser.add_argument("--max-body", type=_size, default=defaults.max_body,
                        help="largest request body, except blob uploads (default 64M; none: no limit)")
    parser.add_argument("--max-blob-body", type=_size, default=defaults.max_blob_body,
                        help="largest /api/blobs upload, admin keys only (default none: no limit)")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                        help="seconds for a whole request head (default %(default)s)")
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout,
                        help="seconds a kept-alive connection may idle, and a body may stall (default %(default)s)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="client connections at once (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    args = parser.parse_args(argv)
    try:
        listen_host, listen_port = parse_hostport(args.listen)
        upstream_host, upstream_port = parse_hostport(args.upstream)
    except ValueError as exc:
        print(f"gate: error: {exc}", file=sys.stderr)
        return 2
    limits = Limits(max_body=args.max_body, max_blob_body=args.max_blob_body, header_timeout=args.header_timeout,
                    idle_timeout=args.idle_timeout, max_connections=args.max_connections)
    stop = threading.Event()

    def on_signal(_signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve_gate(listen_host, listen_port, upstream_port, args.keys, stop, limits=limits,
                   upstream_host=upstream_host, access_log=not args.quiet)
    except (KeysFileError, ValueError) as exc:
        print(f"gate: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gate: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
