"""The gate: an authenticating reverse proxy in front of ollama (issue 31).

ollama has no authentication; the gate listens where users reach the model
and forwards to ollama on loopback:

* every request needs `Authorization: Bearer KEY` with a key from the keys
  file (supervisor/keys.py); a missing or wrong key gets 401 with ollama's
  error shape `{"error": "..."}` and `WWW-Authenticate: Bearer`;
* the routes that change the model store (/api/create, /api/delete,
  /api/copy, /api/pull, /api/push, /api/blobs/*, and the ollama.com
  account routes of current ollama (v0.32): /api/me, /api/signin,
  /api/signout, /api/user/keys/*, /api/experimental/web_search|web_fetch,
  which act as or spend the signed-in account) need an admin key, whatever the method (403 otherwise). The
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
  The body's first MiB (the whole body of every request but a blob upload)
  is read and checked before ollama is connected, and sent with the head
  under a Content-Length (a chunked body too); a longer body streams on.
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

The listener, its workers and the command line are here; request parsing,
limits and errors in gate_http.py, one client connection in gate_conn.py,
forwarding to ollama and streaming its answer back in gate_proxy.py.

    python3 -m supervisor.gate --listen HOST:PORT --upstream 127.0.0.1:PORT --keys FILE
"""

from __future__ import annotations

import argparse
import ipaddress
import queue
import select
import signal
import socket
import sys
import threading

from .gate_conn import _Connection
from .gate_http import WORKER_IDLE_SECONDS, HttpError, Limits, _error_response, log
from .gate_http import ADMIN_ROUTES, BLOB_ROUTE, MiB, Request, needs_admin, route_of  # noqa: F401 - re-exported
from .keys import KeysFileError, KeyStore


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
        self.upstream_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.upstream_text = _format_hostport(host, int(upstream_port))
        self.listen = (listen_host or "0.0.0.0", int(listen_port))
        self.keys = KeyStore(keys_file, on_change=log)
        self.access_log = access_log
        self.stopping = threading.Event()
        self.listener: socket.socket | None = None
        self._active = 0
        self._spare = 0  # idle workers not reserved for a connection
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
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
                        spare = self._spare > 0  # an idle worker, now reserved for this connection
                        if spare:
                            self._spare -= 1
                if full:
                    self._reject(sock)
                elif spare:
                    self._jobs.put((sock, address))
                else:
                    try:
                        threading.Thread(target=self._worker, args=(sock, address), daemon=True).start()
                    except RuntimeError:  # no thread to be had (the container's pids limit): refuse this one, keep serving
                        with self._lock:
                            self._active -= 1
                        self._reject(sock)
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

    def _worker(self, sock: socket.socket, address) -> None:
        """Serve connections: this one, then those handed over while idle
        (a thread started per connection costs ~0.1 ms of the first byte).
        Idle workers are counted as spare; one idle for a minute and not
        reserved meanwhile ends."""
        while True:
            self._run(sock, address)
            with self._lock:
                self._spare += 1
            while True:
                try:
                    sock, address = self._jobs.get(timeout=WORKER_IDLE_SECONDS)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._spare > 0:  # not reserved: retire
                            self._spare -= 1
                            return
                    # reserved just now: the connection is on its way

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
    if text in ("none", "unlimited"):
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
