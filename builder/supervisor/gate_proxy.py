"""The gate's upstream side (supervisor/gate.py): one request forwarded to
ollama on a fresh connection, under a head the gate writes itself, and
ollama's answer streamed back to the client as it arrives (re-chunked for an
HTTP/1.1 client when it is chunked or close-delimited), while the client is
watched for hanging up."""

from __future__ import annotations

import select
import socket

from .gate_http import (
    BUFFER, CHUNK_LINE, DIGITS, PREFETCH, REASONS, REQUEST_DROP, RESPONSE_DROP, STATUS_LINE, UPSTREAM_LIMITS,
    HttpError, Request, _BadUpstream, _Closed, _ClientGone, _read_head, _Reader, _values,
)


# What only an admin key may ask of a loaded model: unloading it
# (keep_alive) or reloading it with other runner options (api.Runner in
# ollama's api/types.go: a change there makes the scheduler reload the model,
# 150 GB for R1). Dropped from other keys' requests, which still run.
RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
                  "use_mmap", "use_mlock", "num_thread", "numa")
MODEL_ROUTES = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
                "/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def _strip(body: bytes) -> tuple[bytes, list[str]]:
    """A JSON body without keep_alive and the runner options; what was dropped."""
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return body, []
    if not isinstance(data, dict):
        return body, []
    dropped = ["keep_alive"] if "keep_alive" in data else []
    data.pop("keep_alive", None)
    options = data.get("options")
    if isinstance(options, dict):
        dropped += [f"options.{name}" for name in RUNNER_OPTIONS if options.pop(name, None) is not None]
    return (json.dumps(data, ensure_ascii=False).encode() if dropped else body), dropped


class _Proxy:
    """_Connection's forwarding half: uses its gate, limits, sock, peer,
    status, sent_head, _send() and _body()."""

    def _forward(self, request: Request, limit: int | None, route: str = "", admin: bool = True) -> bool:
        """Read the body's first MiB (all of it, mostly) before ollama hears of
        the request, so that a malformed or oversized small body never reaches
        it; then connect, send, relay the rest and the answer. Without an
        admin key, a model route's body loses keep_alive and the runner
        options (RUNNER_OPTIONS), and may not exceed that first MiB."""
        gate = self.gate
        body = self._body(request, limit)
        if request.has_body and request.expect_continue:
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        prefix, complete = bytearray(), True
        for piece in body:
            prefix += piece
            if len(prefix) >= PREFETCH:
                complete = False
                break
        if not admin and route in MODEL_ROUTES:
            if not complete:
                raise HttpError(413, f"request body too large: over {PREFETCH} bytes on {route} needs an admin key")
            stripped, dropped = _strip(bytes(prefix))
            if dropped:
                prefix = bytearray(stripped)
                self.note = "dropped " + ",".join(dropped)
        upstream = socket.socket(gate.upstream_family, socket.SOCK_STREAM)
        try:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.settimeout(self.limits.connect_timeout)
            try:
                upstream.connect(gate.upstream)
            except OSError:
                raise HttpError(502, f"bad gateway: ollama is not answering on {gate.upstream_text}") from None
            upstream.settimeout(None)
            return self._exchange(request, upstream, body, bytes(prefix), complete)
        finally:
            upstream.close()  # ollama sees the end of the connection at once: a client that left stops its work

    def _exchange(self, request: Request, upstream: socket.socket, body, prefix: bytes, complete: bool) -> bool:
        lines = [f"{request.method} {request.target} HTTP/1.1", f"Host: {self.gate.upstream_text}"]
        tokens = {t.strip().lower() for value in _values(request.headers, "connection") for t in value.split(",")}
        for name, value in request.headers:
            lowered = name.lower()
            if lowered not in REQUEST_DROP and lowered not in tokens:
                lines.append(f"{name}: {value}")
        lines.append(f"X-Forwarded-For: {self.peer}")
        if request.chunked and not complete:
            lines.append("Transfer-Encoding: chunked")
        elif request.chunked or request.length is not None:
            lines.append(f"Content-Length: {len(prefix) if complete else request.length}")
        lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        state = {"poll": select.poll()}
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
            if complete:
                upstream.sendall(head + prefix)
            elif request.chunked:
                upstream.sendall(head + b"%x\r\n%s\r\n" % (len(prefix), prefix))
                for piece in body:
                    upstream.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                upstream.sendall(b"0\r\n\r\n")
            else:
                upstream.sendall(head + prefix)
                for piece in body:
                    upstream.sendall(piece)
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
        lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, '')}"]
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
