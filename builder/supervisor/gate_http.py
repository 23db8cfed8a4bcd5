"""The gate's HTTP/1.1 side (supervisor/gate.py): limits, errors, reading.

Request-head parsing and validation (a request the gate refuses is an
HttpError: status, message, extra headers), the route an admin key is
needed for, the buffered socket reader both sides of the gate use, and the
error answers the gate writes itself. Standard library only.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

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
    max_connections: int = 128  # more get 503 and are closed; well under the containers' pids_limit (512), which ollama shares
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
TARGET = re.compile(rb"/[\x21\x22\x24-\x7e]*\Z")  # visible ASCII, no "#" (a fragment is never sent)
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
WORKER_IDLE_SECONDS = 60.0
PREFETCH = 1 * MiB  # body bytes read before ollama is connected
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
