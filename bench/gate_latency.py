"""What the gate (builder/supervisor/gate.py) adds to a streamed answer, on loopback.

    python3 bench/gate_latency.py [--requests 50] [--chunks 20] [--interval-ms 5]
    python3 bench/gate_latency.py --ollama 127.0.0.1:11434 --model tiny   # also against a running ollama

Three processes: a synthetic upstream that streams NDJSON the way ollama
does (Transfer-Encoding: chunked, one JSON line a chunk, each stamped with
CLOCK_MONOTONIC at the moment it is written), the gate in front of it, and
this client. For each request, direct and through the gate (alternating,
one new connection each, as curl makes them):

* time to first byte: from the request's first byte sent to the first body
  byte received;
* per chunk: the chunk's one-way time, from the upstream's write to this
  client's read (the three processes share CLOCK_MONOTONIC).

The gate's cost is the difference of the medians. With --ollama the same
is measured against a real ollama (or the test double) with a generate
request: time to first byte, and the gaps between chunks (no stamps there).

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# -- the synthetic upstream ------------------------------------------------------


def _serve_one(conn: socket.socket, chunks: int, interval: float) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")
        for index in range(chunks):
            if index and interval:
                time.sleep(interval)
            line = json.dumps({"i": index, "t": time.monotonic_ns(), "done": index == chunks - 1}).encode() + b"\n"
            conn.sendall(b"%x\r\n%s\r\n" % (len(line), line))
        conn.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    finally:
        conn.close()


def serve_upstream(port: int, chunks: int, interval: float) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=256)
    print(f"upstream listening on {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(conn, chunks, interval), daemon=True).start()


# -- the client ------------------------------------------------------------------------


def stream_request(host: str, port: int, path: str, body: dict, key: str | None = None,
                   timeout: float = 60.0) -> dict:
    """POST `body` to `path` on a new connection and read the chunked (or
    close-delimited) answer line by line. Returns status, ttfb (seconds),
    lines [(monotonic_ns when read, bytes)]."""
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", "Connection: close"]
    if key:
        head.append(f"Authorization: Bearer {key}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        started = time.monotonic_ns()
        sock.sendall(request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("closed before the head")
            buffer += more
            now = time.monotonic_ns()
        response_head, _, buffer = buffer.partition(b"\r\n\r\n")
        status = int(response_head.split(b" ", 2)[1])
        chunked = b"transfer-encoding: chunked" in response_head.lower()
        first = now if buffer else None
        lines: list[tuple[int, bytes]] = []
        text = b""
        done = False
        while True:
            if chunked:  # take every whole chunk in the buffer
                while True:
                    size_line, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        done = True
                        break
                    if len(rest) < size + 2:
                        break
                    text += rest[:size]
                    buffer = rest[size + 2:]
            else:
                text, buffer = text + buffer, b""
            while b"\n" in text:
                line, _, text = text.partition(b"\n")
                lines.append((now, line))
            if done:
                break
            more = sock.recv(65536)
            if not more:
                break
            now = time.monotonic_ns()
            first = first or now
            buffer += more
        return {"status": status, "ttfb": ((first or time.monotonic_ns()) - started) / 1e9, "lines": lines,
                "head": response_head, "complete": done or not chunked}
    finally:
        sock.close()


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def _p90_ms(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] * 1e3 if len(values) >= 10 else float("nan")


def measure_synthetic(direct: tuple[str, int], gate: tuple[str, int], key: str, requests: int) -> dict:
    """Median TTFB and per-chunk one-way time, direct and through the gate (seconds)."""
    results = {"direct": {"ttfb": [], "chunk": []}, "gate": {"ttfb": [], "chunk": []}}
    for _ in range(requests):
        for side, (host, port), k in (("direct", direct, None), ("gate", gate, key)):
            answer = stream_request(host, port, "/stream", {"stream": True}, k)
            assert answer["status"] == 200, answer["head"]
            results[side]["ttfb"].append(answer["ttfb"])
            for read_at, line in answer["lines"]:
                results[side]["chunk"].append((read_at - json.loads(line)["t"]) / 1e9)
    return results


def measure_ollama(direct: tuple[str, int], gate: tuple[str, int], key: str, model: str, requests: int,
                   num_predict: int = 16) -> dict:
    """Median TTFB and gap between chunks of a streamed generate, direct and through the gate."""
    body = {"model": model, "prompt": "Why is the sky blue?", "stream": True, "options": {"num_predict": num_predict}}
    results = {"direct": {"ttfb": [], "gap": []}, "gate": {"ttfb": [], "gap": []}}
    for _ in range(requests):
        for side, (host, port), k in (("direct", direct, None), ("gate", gate, key)):
            answer = stream_request(host, port, "/api/generate", body, k)
            assert answer["status"] == 200, answer["head"]
            results[side]["ttfb"].append(answer["ttfb"])
            stamps = [t for t, _ in answer["lines"]]
            results[side]["gap"] += [(b - a) / 1e9 for a, b in zip(stamps, stamps[1:])]
    return results


def summary(results: dict, per: str) -> list[str]:
    lines = []
    for metric in ("ttfb", per):
        direct, gated = results["direct"][metric], results["gate"][metric]
        label = {"ttfb": "time to first byte", "chunk": "per chunk (one way)", "gap": "gap between chunks"}[metric]
        lines.append(f"{label:22} direct median {_median_ms(direct):7.3f} ms (p90 {_p90_ms(direct):7.3f})   "
                     f"gate median {_median_ms(gated):7.3f} ms (p90 {_p90_ms(gated):7.3f})   "
                     f"added {_median_ms(gated) - _median_ms(direct):+7.3f} ms")
    return lines


# -- processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_gate(upstream_port: int, keys_file: str, *extra: str, listen: str | None = None,
               log=subprocess.DEVNULL) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "builder"), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen(
        [sys.executable, "-m", "supervisor.gate", "--listen", listen or f"127.0.0.1:{port}",
         "--upstream", f"127.0.0.1:{upstream_port}", "--keys", keys_file, *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--ollama", help="HOST:PORT of a running ollama to measure too")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream, args.chunks, args.interval_ms / 1e3)
        return 0
    sys.path.insert(0, str(REPO / "builder"))
    from supervisor.keys import add_key

    with tempfile.TemporaryDirectory() as folder:
        keys = os.path.join(folder, "keys")
        key = add_key(keys, "bench")
        upstream_port = free_port()
        upstream = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(upstream_port),
                                     "--chunks", str(args.chunks), "--interval-ms", str(args.interval_ms)],
                                    stdout=subprocess.DEVNULL)
        processes = [upstream]
        try:
            gate, gate_port = start_gate(upstream_port, keys, "--quiet")
            processes.append(gate)
            wait_port(upstream_port)
            wait_port(gate_port)
            stream_request("127.0.0.1", gate_port, "/stream", {}, key)  # warm
            print(f"synthetic upstream: {args.requests} requests each way, {args.chunks} chunks "
                  f"{args.interval_ms:g} ms apart, a new connection each")
            for line in summary(measure_synthetic(("127.0.0.1", upstream_port), ("127.0.0.1", gate_port), key,
                                                  args.requests), "chunk"):
                print("  " + line)
            if args.ollama:
                host, _, port = args.ollama.rpartition(":")
                gate2, gate2_port = start_gate(int(port), keys, "--quiet")
                processes.append(gate2)
                wait_port(gate2_port)
                print(f"ollama at {args.ollama}, model {args.model}: {args.requests} generate requests each way")
                for line in summary(measure_ollama((host, int(port)), ("127.0.0.1", gate2_port), key, args.model,
                                                   args.requests), "gap"):
                    print("  " + line)
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
