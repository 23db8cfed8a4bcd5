#!/usr/bin/env python3
"""A DOUBLE of the ollama binary, for tests only: no ollama binary can be had here.

It stands in for `ollama` v0.5.7 where builder touches it, following ollama's
documented HTTP API. This first cut answers `--version` and runs `serve`
with `GET|HEAD /` ("Ollama is running") and `GET /api/version`; the artifacts
issue grows it into the full double (blobs, create, tags, show, generate).
Standard library only: it runs inside the test image.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.5.7"


class Handler(BaseHTTPRequestHandler):
    server_version = "ollama-double"

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif self.path == "/api/version":
            self._send(200, json.dumps({"version": VERSION}).encode(), "application/json; charset=utf-8")
        else:
            self._send(404, b"404 page not found", "text/plain")

    do_HEAD = do_GET

    def log_message(self, fmt: str, *args) -> None:
        sys.stderr.write(f"[ollama-double] {fmt % args}\n")


def host_port() -> tuple[str, int]:
    value = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434")
    value = value.split("://", 1)[-1]
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port or 11434)


def main(argv: list[str]) -> int:
    if argv[:1] in (["--version"], ["-v"]):
        print(f"ollama version is {VERSION} (double)")
        return 0
    if argv[:1] == ["serve"]:
        server = ThreadingHTTPServer(host_port(), Handler)
        sys.stderr.write(f"[ollama-double] listening on {server.server_address}\n")
        server.serve_forever()
        return 0
    print(f"ollama double: unsupported command {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
