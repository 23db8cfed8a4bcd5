"""The supervisor's streamed `POST /api/create`: each way ollama's answer can
go wrong is one line, against a server on 127.0.0.1 that answers as told."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from builder.supervisor.common import StepError
from builder.supervisor.ollama import create_streamed

ANSWERS = {
    "http-error": (500, [{"error": "boom"}], 0),
    "plain-http-error": (500, [b"not json at all"], 0),
    "error-line": (200, [{"status": "parsing GGUF"}, {"error": 'split GGUF "x-00001-of-00002.gguf" has 1 shards, expected 2'}], 0),
    "no-success": (200, [{"status": "parsing GGUF"}, {"status": "writing manifest"}], 0),
    "silent": (200, [{"status": "verifying conversion"}], 1),  # then says nothing until the test is done
    "success": (200, [{"status": "validating GGUF model", "total": 10, "completed": 5}, {"status": "success"}], 0),
}


class Answering(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, lines, pause = ANSWERS[self.server.case]  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for line in lines:
            self.wfile.write(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")
            self.wfile.flush()
        if pause:
            self.server.release.wait(timeout=60)  # type: ignore[attr-defined] - silent, holding the connection open

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    httpd.release = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(("case", "message"), [
    ("http-error", r"^create: ollama refused to create m \(HTTP 500: boom\)$"),
    ("plain-http-error", r"^create: ollama refused to create m \(HTTP 500: not json at all\)$"),
    ("error-line", r'^create: ollama refused to create m: split GGUF "x-00001-of-00002.gguf" has 1 shards, expected 2$'),
    ("no-success", r"^create: ollama's answer to creating m ended without success$"),
    ("silent", r"^create: ollama said nothing for 1 s while creating m; the storage may be stalled, see the private ollama's log$"),
])
def test_each_failure_is_one_line(server, case: str, message: str) -> None:
    server.case = case
    with pytest.raises(StepError, match=message):
        create_streamed(f"http://127.0.0.1:{server.server_port}", {"model": "m"}, idle_timeout=1)


def test_success_after_progress(server, capsys) -> None:
    server.case = "success"
    create_streamed(f"http://127.0.0.1:{server.server_port}", {"model": "m"}, idle_timeout=5)
    assert "create: ollama: validating GGUF model" not in capsys.readouterr().out  # under 64 MiB: no progress lines
