"""The gate (builder/supervisor/gate.py, issue 31): API keys in front of ollama.

Real processes on loopback only: the ollama double from the test release
archive (its runner is real llama.cpp) serving the tiny model, the gate as
`python -m supervisor.gate` in front of it, and real clients (curl, the
`openai` SDK, the `ollama` Python client, the double's own CLI). Where the
double cannot show a property (it does not stream the /v1 routes; timing
the upstream socket), a small upstream written here stands in.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.gate_latency import measure_ollama, measure_synthetic, start_gate, stream_request, summary, wait_port
from builder.sample import write_split_model
from builder.supervisor import gate as gate_module
from builder.supervisor.create import create
from builder.supervisor.keys import KeysFileError, KeyStore, add_key, list_keys, parse_keys, revoke_key
from builder.supervisor.merge import merge
from tests.conftest import REPO
from tests.fixtures.ollama_release import unpack_ollama_release
from tests.helpers import free_port
from tests.test_supervisor_create import runtime_for

PROBE = "/api/bad-input-probe"  # a path no accepted request uses: it must never reach ollama


@dataclass
class Stack:
    root: Path
    ollama: Path
    ollama_port: int
    ollama_log: Path
    keys: Path
    alice: str  # a user key
    ops: str  # an admin key
    gate_port: int
    gate_log: Path
    env: dict


def _wait_http(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            status, _, _ = request(port, "GET", "/api/version")
            if status:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"nothing answers on 127.0.0.1:{port}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    ollama = unpack_ollama_release(root / "release")
    runtime = runtime_for(root / "models", ollama)
    write_split_model(root / "models" / "tiny", "tiny", 3)
    assert merge(runtime) == 0 and create(runtime) == 0
    port = free_port()
    env = dict(os.environ, OLLAMA_HOST=f"127.0.0.1:{port}", OLLAMA_MODELS=runtime["ollama_store"],
               OLLAMA_KEEP_ALIVE="-1", HOME=str(root))
    ollama_log = root / "ollama.log"
    keys = root / "keys"
    alice, ops = add_key(str(keys), "alice"), add_key(str(keys), "ops", admin=True)
    gate_log = root / "gate.log"
    with open(ollama_log, "w") as out_ollama, open(gate_log, "w") as out_gate:
        serve = subprocess.Popen([str(ollama), "serve"], env=env, stdout=out_ollama, stderr=subprocess.STDOUT)
        gate, gate_port = start_gate(port, str(keys), log=out_gate)
    try:
        _wait_http(port)
        wait_port(gate_port)
        yield Stack(root, ollama, port, ollama_log, keys, alice, ops, gate_port, gate_log, env)
    finally:
        for process in (gate, serve):
            process.terminate()
            process.wait(30)
    logged = gate_log.read_text()
    for secret in (alice, ops):
        assert secret not in logged, "a key reached the gate's log"
    assert "Why is the sky blue" not in logged and "sky" not in logged, "a prompt reached the gate's log"


# -- small clients ------------------------------------------------------------------------


def request(port: int, method: str, path: str, body: bytes | dict | None = None, key: str | None = None,
            headers: dict | None = None, host: str = "127.0.0.1", timeout: float = 60) -> tuple[int, dict, bytes]:
    """One request on a new connection (http.client: no proxy is ever consulted)."""
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        sent = dict(headers or {})
        if key:
            sent["Authorization"] = f"Bearer {key}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def raw(port: int, data: bytes, timeout: float = 10.0, host: str = "127.0.0.1") -> bytes:
    """Send bytes as they are; everything the gate answers until it closes."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while True:
                more = sock.recv(65536)
                if not more:
                    return received
                received += more
        except socket.timeout:
            raise AssertionError(f"the connection stayed open after {received[:200]!r}") from None
        except ConnectionResetError:
            return received


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, f"not an HTTP response: {response[:200]!r}"
    return int(match.group(1))


def tags(stack: Stack) -> list[str]:
    status, _, body = request(stack.ollama_port, "GET", "/api/tags")
    assert status == 200
    return [m["name"] for m in json.loads(body)["models"]]


def gin_lines(stack: Stack, path: str) -> list[str]:
    return [line for line in stack.ollama_log.read_text().splitlines() if line.startswith("[GIN]") and f'"{path}' in line]


def assert_gate_serves(stack: Stack, port: int | None = None) -> None:
    """A valid request still gets its answer (and ollama is healthy)."""
    status, _, body = request(port or stack.gate_port, "GET", "/api/version", key=stack.alice)
    assert status == 200 and json.loads(body)["version"] == "0.5.7", body
    assert "tiny:latest" in tags(stack)


GENERATE = {"model": "tiny", "prompt": "Why is the sky blue?", "stream": False, "options": {"num_predict": 4}}


# -- keys and roles, with real clients ---------------------------------------------------------------


def test_curl_answers_with_a_key_401_without_and_403_for_a_store_change(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.gate_port}"

    def curl(*args: str) -> tuple[int, dict, str]:
        result = subprocess.run(["curl", "-s", "--noproxy", "*", "-D", "-", *args], capture_output=True, text=True, timeout=60)
        head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
        status = int(head.split()[1])
        headers = dict(line.lower().split(": ", 1) for line in head.splitlines()[1:])
        return status, headers, body

    status, headers, body = curl(f"{base}/api/tags")
    assert status == 401 and headers["www-authenticate"] == "bearer" and "error" in json.loads(body)
    assert headers["content-type"].startswith("application/json")
    status, _, body = curl("-H", "Authorization: Bearer not-a-key-of-this-gate", f"{base}/api/tags")
    assert status == 401 and json.loads(body) == {"error": "unauthorized: invalid API key"}
    status, _, body = curl("-H", f"Authorization: Basic {stack.alice}", f"{base}/api/tags")
    assert status == 401, "only the Bearer scheme"

    auth = ("-H", f"Authorization: Bearer {stack.alice}")
    status, _, body = curl(*auth, f"{base}/api/tags")
    assert status == 200 and [m["name"] for m in json.loads(body)["models"]] == ["tiny:latest"]
    status, _, body = curl(*auth, "-d", json.dumps(GENERATE), f"{base}/api/generate")
    direct = request(stack.ollama_port, "POST", "/api/generate", GENERATE)[2]
    assert status == 200 and json.loads(body)["response"] == json.loads(direct)["response"] != ""
    for path in ("/", "/api/version", "/api/ps"):
        assert curl(*auth, f"{base}{path}")[0] == 200, path
    assert request(stack.gate_port, "HEAD", "/", key=stack.alice)[0] == 200
    assert curl(*auth, "-d", '{"model": "tiny"}', f"{base}/api/show")[0] == 200
    assert curl(*auth, f"{base}/api/no-such-route")[0] == 404, "unknown routes are ollama's to answer"

    # The store: refused for a user key, whatever the spelling of the path.
    for path in ("/api/delete", "/api/%64elete", "/API/DELETE", "//api//delete", "/api/./delete", "/api%2Fdelete",
                 "/x/../api/delete"):
        status, _, body = curl(*auth, "--path-as-is", "-X", "DELETE", "-d", '{"model": "tiny"}', f"{base}{path}")
        assert status == 403 and "admin" in json.loads(body)["error"], (path, status, body)
    for method, path in (("POST", "/api/create"), ("POST", "/api/copy"), ("POST", "/api/pull"), ("POST", "/api/push"),
                         ("HEAD", "/api/blobs/sha256:" + "0" * 64), ("GET", "/api/blobs/x")):
        assert curl(*auth, "-X", method, "-d", "{}", f"{base}{path}")[0] == 403, path
    assert tags(stack) == ["tiny:latest"], "the model is still there"
    assert not gin_lines(stack, "/api/delete") and not gin_lines(stack, "/api/copy"), "refused at the gate"


def gate_lines_for(stack: Stack, text: str, wait: float = 5.0) -> list[str]:
    """The gate's log lines holding `text`, waiting up to `wait` seconds for
    one: the gate logs a request after answering it, and a client may have
    exited before the line is written."""
    deadline = time.monotonic() + wait
    while True:
        lines = [line for line in stack.gate_log.read_text().splitlines() if text in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_openai_sdk_and_ollama_client_and_the_ollama_cli(stack: Stack) -> None:
    import ollama
    import openai

    base = f"http://127.0.0.1:{stack.gate_port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=stack.alice, max_retries=0)
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert answer.choices[0].message.content and answer.usage.completion_tokens == 5
    completion = client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert completion.choices[0].text
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong-key-0000000000", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert refused.value.status_code == 401

    user = ollama.Client(host=base, headers={"Authorization": f"Bearer {stack.alice}"})
    assert user.generate(model="tiny", prompt="hi", options={"num_predict": 4}).response
    pieces = [part.message.content for part in user.chat(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                          stream=True, options={"num_predict": 4})]
    assert len(pieces) == 5 and "".join(pieces)
    assert [m.model for m in user.list().models] == ["tiny:latest"]
    with pytest.raises(ollama.ResponseError) as no_key:
        ollama.Client(host=base).list()
    assert no_key.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as not_admin:
        user.delete("tiny")
    assert not_admin.value.status_code == 403
    assert [m.model for m in user.list().models] == ["tiny:latest"]
    admin = ollama.Client(host=base, headers={"Authorization": f"Bearer {stack.ops}"})
    assert admin.show("tiny").modelfile

    # ollama's own CLI sends no Authorization header: refused.
    cli = subprocess.run([str(stack.ollama), "list"], env=dict(stack.env, OLLAMA_HOST=f"127.0.0.1:{stack.gate_port}"),
                         capture_output=True, text=True, timeout=60)
    # (its heartbeat, HEAD /, gets an empty 401: api.StatusError's generic message, as with a real 0.5.7)
    assert cli.returncode == 1 and cli.stderr == "Error: something went wrong, please see the ollama server logs for details\n", cli
    assert gate_lines_for(stack, "HEAD / 401"), "refused at the gate"


def test_a_revoked_key_is_refused_at_its_next_request_and_the_model_stays_loaded(stack: Stack) -> None:
    bob = add_key(str(stack.keys), "bob")
    carol = add_key(str(stack.keys), "carol")
    for key in (bob, carol, stack.alice):
        assert request(stack.gate_port, "POST", "/api/generate", GENERATE, key=key)[0] == 200
    loads = stack.ollama_log.read_text().count("starting llama server")
    (loaded,) = json.loads(request(stack.ollama_port, "GET", "/api/ps")[2])["models"]

    assert revoke_key(str(stack.keys), "bob")  # by the helper: a new file renamed into place
    status, headers, body = request(stack.gate_port, "POST", "/api/generate", GENERATE, key=bob)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    text = stack.keys.read_text()  # by hand: the same file rewritten in place
    with open(stack.keys, "w") as handle:
        handle.write("".join(line for line in text.splitlines(keepends=True) if not line.startswith("carol ")))
    assert request(stack.gate_port, "GET", "/api/tags", key=carol)[0] == 401
    assert request(stack.gate_port, "POST", "/api/generate", GENERATE, key=stack.alice)[0] == 200

    assert stack.ollama_log.read_text().count("starting llama server") == loads, "no reload in ollama"
    (still,) = json.loads(request(stack.ollama_port, "GET", "/api/ps")[2])["models"]
    assert still["name"] == loaded["name"] and still["size"] == loaded["size"]
    assert [name for name, _ in list_keys(str(stack.keys))] == ["alice", "ops"]


def test_the_keys_file_must_be_private_and_an_unusable_file_refuses_everything(stack: Stack, tmp_path: Path) -> None:
    loose = tmp_path / "keys"
    add_key(str(loose), "x")
    os.chmod(loose, 0o644)
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.gate", "--listen", f"127.0.0.1:{free_port()}", "--upstream",
         f"127.0.0.1:{stack.ollama_port}", "--keys", str(loose)],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "builder"), os.environ["PYTHONPATH"]])),
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr == f"gate: error: {loose}: mode 0644; the keys file must be readable by its owner only: chmod 600 {loose}\n"

    # At run time: a file made readable by others refuses every request (fail closed), until fixed.
    os.chmod(stack.keys, 0o640)
    try:
        status, _, body = request(stack.gate_port, "GET", "/api/tags", key=stack.alice)
        assert status == 503 and "keys file" in json.loads(body)["error"]
    finally:
        os.chmod(stack.keys, 0o600)
    assert request(stack.gate_port, "GET", "/api/tags", key=stack.alice)[0] == 200
    assert "mode 0640" in stack.gate_log.read_text()


def test_key_file_formats_and_helpers(tmp_path: Path) -> None:
    path = str(tmp_path / "keys")
    first = add_key(path, "alice")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(first) == 43
    second = add_key(path, "ops", admin=True)
    assert list_keys(path) == [("alice", False), ("ops", True)]
    with pytest.raises(KeysFileError, match="exists"):
        add_key(path, "alice")
    store = KeyStore(path)
    assert store.authenticate(first).name == "alice" and store.authenticate(second).admin
    assert store.authenticate(first + "x") is None and store.authenticate("") is None
    assert revoke_key(path, "alice") and not revoke_key(path, "alice")
    assert store.authenticate(first) is None and store.authenticate(second).name == "ops"

    # JSON, as a compose secret or a Kubernetes Secret may carry it.
    as_json = tmp_path / "keys.json"
    as_json.write_text(json.dumps({"keys": [{"name": "a", "key": "k" * 20, "admin": True}, {"name": "b", "key": "j" * 20}]}))
    os.chmod(as_json, 0o600)
    assert [(k.name, k.admin) for k in KeyStore(str(as_json)).current()] == [("a", True), ("b", False)]
    add_key(str(as_json), "c")
    assert [name for name, _ in list_keys(str(as_json))] == ["a", "b", "c"]

    # Errors name the file and the line, never the line (it may hold a key).
    secret = "s3cr3t-" + "x" * 20
    for text, message in ((f"alice {secret} root\n", "expected `NAME KEY`"), (f"alice {secret}\nbob {secret}\n", "same key"),
                          (f"a {secret}\na {secret}x\n", "given twice"), ("alice short\n", "16 to 512")):
        with pytest.raises(KeysFileError, match=message) as error:
            parse_keys(text, "F")
        assert secret not in str(error.value)


def test_routes_that_need_an_admin_key() -> None:
    admin = ["/api/delete", "/api/create", "/api/copy", "/api/pull", "/api/push", "/api/blobs/sha256:00",
             "/api/%64elete", "/API/Delete", "/api//delete", "/api/delete/", "/./api/delete", "/x/../api/delete",
             "/api%2fdelete", "/api/%2564elete", "/api\\delete", "/api/delete?x=1", "/api/signout", "/api/me",
             "/api/user/keys/abc", "/api/experimental/web_fetch"]
    user = ["/", "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/chat/completions", "/v1/models",
            "/api/tags", "/api/show", "/api/ps", "/api/version", "/api/deleted", "/api/blobsx", "/api/createx?/api/create"]
    assert [p for p in admin if not gate_module.needs_admin(gate_module.route_of(p))] == []
    assert [p for p in user if gate_module.needs_admin(gate_module.route_of(p))] == []


def test_blob_uploads_need_an_admin_key_and_have_no_body_limit(stack: Stack, tmp_path: Path) -> None:
    data = os.urandom(70 * 1024 * 1024)  # over the 64 MiB limit of every other route
    digest = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    url = f"http://127.0.0.1:{stack.gate_port}/api/blobs/sha256:{digest}"

    def upload(key: str) -> str:  # curl sends Expect: 100-continue for a body this size
        return subprocess.run(["curl", "-s", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}",
                               "-H", f"Authorization: Bearer {key}", "--data-binary", f"@{blob}", url],
                              capture_output=True, text=True, timeout=120).stdout

    assert upload(stack.alice) == "403"
    assert upload(stack.ops) == "201"
    stored = Path(stack.env["OLLAMA_MODELS"]) / "blobs" / f"sha256-{digest}"
    assert stored.stat().st_size == len(data)
    stored.unlink()
    big = tmp_path / "big.json"
    big.write_bytes(b"{" + b" " * (65 * 1024 * 1024) + b"}")
    result = subprocess.run(["curl", "-s", "--noproxy", "*", "-H", f"Authorization: Bearer {stack.ops}", "--data-binary",
                             f"@{big}", f"http://127.0.0.1:{stack.gate_port}/api/generate"], capture_output=True, text=True, timeout=60)
    assert "request body too large" in json.loads(result.stdout)["error"], "other routes keep the limit, admin or not"
    assert_gate_serves(stack)


# -- streaming -----------------------------------------------------------------------------------------


class Upstream:
    """A stand-in for ollama on loopback: `behaviour(conn, request_bytes)` per connection, in a thread."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.listener.getsockname()[1]
        self.events: list[tuple[str, float]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            while match and len(body) < int(match.group(1)):
                body += conn.recv(65536)
            try:
                self.behaviour(self, conn, head)
            except OSError:
                self.events.append(("closed", time.monotonic()))

    def close(self) -> None:
        self.listener.close()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


NDJSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"


def _listening(pid: int) -> str:
    """The ports process `pid` listens on, as ':PORT' words (from /proc/net/tcp[6] and its sockets)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in list(handle)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.append(f":{int(fields[1].rsplit(':', 1)[1], 16)}")
    return " ".join(ports) + " "


@pytest.fixture
def private_gate(stack: Stack):
    """Start a gate (own flags) in front of any upstream port; stopped afterwards."""
    started = []

    def start(upstream_port: int, *flags: str, listen: str | None = None) -> int:
        for _attempt in range(3):
            log = open(stack.root / f"gate-{len(started)}.log", "w")
            process, port = start_gate(upstream_port, str(stack.keys), *flags, listen=listen, log=log)
            started.append((process, log))
            host = "::1" if listen and listen.startswith("[") else "127.0.0.1"
            wait_port(int(listen.rpartition(":")[2]) if listen else port, host=host)
            time.sleep(0.2)
            # Ours answers there, not another process that took the port first (free_port is a guess).
            if process.poll() is None and f":{int(listen.rpartition(':')[2]) if listen else port}" in _listening(process.pid):
                return int(listen.rpartition(":")[2]) if listen else port
            process.kill()
            process.wait()
            started.pop()
            log.close()
        raise AssertionError(f"the gate did not start: {(stack.root / f'gate-{len(started)}.log').read_text()}")

    yield start
    for process, log in started:
        process.terminate()
        assert process.wait(10) == 0, "SIGTERM ends the gate cleanly"
        log.close()


def test_streams_pass_through_as_they_arrive_ndjson_sse_and_http_1_0(stack: Stack, private_gate) -> None:
    import openai

    release = threading.Event()

    def hold(upstream, conn, head):
        """The first piece, then nothing until the client has read it through the gate."""
        if b"/v1/chat/completions" in head:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "first"}, "finish_reason": None}]}
            conn.sendall(chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
            assert release.wait(20)
            event["choices"][0]["delta"] = {"content": " second"}
            conn.sendall(chunk(b"data: " + json.dumps(event).encode() + b"\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        else:
            conn.sendall(NDJSON_HEAD + chunk(b'{"response":"first","done":false}\n'))
            assert release.wait(20)
            conn.sendall(chunk(b'{"response":"second","done":true}\n') + b"0\r\n\r\n")

    upstream = Upstream(hold)
    port = private_gate(upstream.port)
    # NDJSON over HTTP/1.1: the first line arrives while ollama still holds the second.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.alice}\r\n"
                     "Content-Length: 2\r\n\r\n{}".encode())
        received = b""
        while b'"first"' not in received:
            received += sock.recv(65536)  # times out (test fails) if the gate buffers
        assert not release.is_set() and b"Transfer-Encoding: chunked\r\n" in received
        release.set()
        while not received.endswith(b"0\r\n\r\n"):
            received += sock.recv(65536)
    release.clear()

    # SSE through the openai SDK: the first event is in the caller's hands before the second exists.
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=stack.alice, max_retries=0, timeout=10)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.content == "first" and not release.is_set()
    release.set()
    assert [c.choices[0].delta.content for c in stream] == [" second"]
    release.clear()

    # HTTP/1.0: no chunked framing, the end of the answer is the end of the connection.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /api/generate HTTP/1.0\r\nAuthorization: Bearer {stack.alice}\r\nContent-Length: 2\r\n\r\n{{}}".encode())
        received = b""
        while b'"first"' not in received:
            received += sock.recv(65536)
        release.set()
        while more := sock.recv(65536):
            received += more
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"Connection: close" in head
    assert body == b'{"response":"first","done":true}\n'.replace(b"true", b"false") + b'{"response":"second","done":true}\n'
    upstream.close()

    # And the real thing, over HTTP/1.0 from the double (which also streams close-delimited to 1.0 clients).
    answer = raw(stack.gate_port, f"POST /api/generate HTTP/1.0\r\nAuthorization: Bearer {stack.alice}\r\nContent-Length: "
                 f"{len(json.dumps(dict(GENERATE, stream=True)))}\r\n\r\n{json.dumps(dict(GENERATE, stream=True))}".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 200 and b"transfer-encoding" not in head.lower()
    assert [json.loads(line)["done"] for line in body.splitlines()] == [False] * 4 + [True]


def test_added_latency_first_byte_and_per_chunk(stack: Stack, private_gate) -> None:
    """Printed for the record (pytest -s); only sane bounds are asserted: speed targets are bench/gate_latency.py's."""
    port = free_port()
    synthetic = subprocess.Popen([sys.executable, str(REPO / "bench" / "gate_latency.py"), "--serve-upstream", str(port),
                                  "--chunks", "10", "--interval-ms", "0.5"], stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        gate_port = private_gate(port, "--quiet")
        synthetic_results = measure_synthetic(("127.0.0.1", port), ("127.0.0.1", gate_port), stack.alice, 50)
    finally:
        synthetic.terminate()
        synthetic.wait(10)
    ollama_results = measure_ollama(("127.0.0.1", stack.ollama_port), ("127.0.0.1", stack.gate_port), stack.alice, "tiny", 50, 8)
    print("\ngate latency, synthetic upstream (50 requests each way, 10 chunks):")
    print("\n".join("  " + line for line in summary(synthetic_results, "chunk")))
    print("gate latency, ollama double + llama.cpp, tiny (50 generate requests each way, 8 tokens):")
    print("\n".join("  " + line for line in summary(ollama_results, "gap")))

    def median(values):
        return sorted(values)[len(values) // 2]

    for results, per in ((synthetic_results, "chunk"), (ollama_results, "gap")):
        assert median(results["gate"]["ttfb"]) < median(results["direct"]["ttfb"]) + 0.1
        assert median(results["gate"][per]) < median(results["direct"][per]) + 0.02
    assert len(ollama_results["gate"]["gap"]) == 50 * 8  # every piece arrived as its own read


def test_64_concurrent_streaming_clients(stack: Stack, private_gate) -> None:
    everyone = threading.Barrier(64)

    def together(upstream, conn, head):
        """Streams only once all 64 requests are in: a gate that serialized them would never finish."""
        conn.sendall(NDJSON_HEAD + chunk(b'{"n":0}\n'))
        everyone.wait(90)
        for n in range(1, 5):
            conn.sendall(chunk(b'{"n":%d}\n' % n))
        conn.sendall(b"0\r\n\r\n")

    upstream = Upstream(together)
    port = private_gate(upstream.port)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda _: stream_request("127.0.0.1", port, "/api/generate", {}, stack.alice, 60), range(64)))
    assert all(a["status"] == 200 and a["complete"] and len(a["lines"]) == 5 for a in answers)
    upstream.close()

    # And against the double (real llama.cpp behind it, 4 sequences at a time
    # on this 2-core machine): 16 streamed generations at once, every one complete.
    body = dict(GENERATE, stream=True, options={"num_predict": 6})
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: stream_request("127.0.0.1", stack.gate_port, "/api/generate", body, stack.alice, 300),
                                range(16)))
    failures = [a["head"][:100] for a in answers if a["status"] != 200 or not a["complete"]]
    assert not failures
    assert all([json.loads(line)["done"] for _, line in a["lines"]] == [False] * 6 + [True] for a in answers)
    assert_gate_serves(stack)


def test_a_client_that_hangs_up_closes_the_upstream_connection(stack: Stack, private_gate) -> None:
    def endless(upstream, conn, head):
        if b"/silent" in head:  # still "reading the prompt": nothing sent yet
            assert conn.recv(1) == b""
            upstream.events.append(("closed", time.monotonic()))
            return
        conn.sendall(NDJSON_HEAD)
        while True:
            conn.sendall(chunk(b'{"response":"x","done":false}\n'))
            time.sleep(0.02)

    upstream = Upstream(endless)
    port = private_gate(upstream.port)
    for path, wait_for_bytes in (("/api/generate", True), ("/silent", False)):
        upstream.events.clear()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.alice}\r\nContent-Length: 0\r\n\r\n".encode())
        if wait_for_bytes:
            received = b""
            while b'"response"' not in received:
                received += sock.recv(65536)
        else:
            time.sleep(0.3)
        hung_up = time.monotonic()
        sock.close()
        deadline = time.monotonic() + 5
        while not upstream.events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert upstream.events, f"{path}: the gate kept its upstream connection after the client left"
        took = upstream.events[0][1] - hung_up
        print(f"\n{path}: upstream connection closed {took * 1e3:.1f} ms after the client hung up")
        assert took < 1.0
    upstream.close()


def test_a_client_that_hangs_up_mid_stream_ends_the_generation_in_ollama(stack: Stack) -> None:
    before = len(gin_lines(stack, "/api/generate"))
    body = json.dumps({"model": "tiny", "prompt": "hi", "options": {"num_predict": 20000}}).encode()  # a minute or more
    sock = socket.create_connection(("127.0.0.1", stack.gate_port), timeout=30)
    sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (stack.alice.encode(), len(body), body))
    received = b""
    while received.count(b'"done":false') < 10:
        received += sock.recv(65536)
    sock.close()
    hung_up = time.monotonic()
    while len(gin_lines(stack, "/api/generate")) == before:
        assert time.monotonic() - hung_up < 10, "ollama is still generating for a client that left"
        time.sleep(0.05)
    print(f"\nollama ended the request {(time.monotonic() - hung_up) * 1e3:.0f} ms after the client hung up")
    assert gate_lines_for(stack, "client hung up"), "the gate logged the hang-up"
    assert_gate_serves(stack)


# -- bad input ---------------------------------------------------------------------------------------------


def _req(head: str, body: bytes = b"", key: bool = True) -> "callable":
    def build(stack: Stack) -> bytes:
        auth = f"Authorization: Bearer {stack.alice}\r\n" if key else ""
        return head.replace("{AUTH}", auth).encode("latin-1") + body
    return build


BAD = {
    # name: (request, expected status)
    "no key": (_req(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\n\r\n", key=False), 401),
    "wrong key": (_req(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope-nope-nope-nope\r\n\r\n", key=False), 401),
    "two Authorization headers": (_req(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}{{AUTH}}\r\n"), 400),
    "request line over 8 KiB": (_req(f"GET {PROBE}?{'a' * 9000} HTTP/1.1\r\nHost: x\r\n{{AUTH}}\r\n"), 414),
    "header line over 8 KiB": (_req(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}X-Big: {'a' * 9000}\r\n\r\n"), 431),
    "head over 64 KiB": (_req(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}" + "".join(f"X-{i}: {'a' * 7000}\r\n" for i in range(10)) + "\r\n"), 431),
    "101 header lines": (_req(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}" + "".join(f"X-{i}: a\r\n" for i in range(101)) + "\r\n"), 431),
    "body over 64 MiB": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Content-Length: {64 * 2**20 + 1}\r\n\r\n", b"{}"), 413),
    "CL.TE smuggling": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n",
                             b"0\r\n\r\nDELETE /api/delete HTTP/1.1\r\nHost: x\r\n\r\n"), 400),
    "TE.CL smuggling": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                             b"1\r\nA\r\n0\r\n\r\n"), 400),
    "differing Content-Lengths": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Content-Length: 2\r\nContent-Length: 3\r\n\r\n", b"{}"), 400),
    "Content-Length list": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Content-Length: 2, 3\r\n\r\n", b"{}"), 400),
    "signed Content-Length": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Content-Length: +2\r\n\r\n", b"{}"), 400),
    "chunked twice": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Transfer-Encoding: chunked, chunked\r\n\r\n", b"0\r\n\r\n"), 400),
    "unknown coding": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Transfer-Encoding: xchunked\r\n\r\n", b"0\r\n\r\n"), 400),
    "two Transfer-Encoding headers": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n", b"0\r\n\r\n"), 400),
    "Transfer-Encoding in HTTP/1.0": (_req(f"POST {PROBE} HTTP/1.0\r\n{{AUTH}}Transfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n"), 400),
    "space before the colon": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Transfer-Encoding : chunked\r\n\r\n", b"0\r\n\r\n"), 400),
    "obsolete line folding": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}X-A: b\r\n Transfer-Encoding: chunked\r\n\r\n"), 400),
    "NUL in a header": (_req(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}X-A: b\x00c\r\n\r\n"), 400),
    "bare CR": (_req(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}X-A: b\rTransfer-Encoding: chunked\r\n\r\n"), 400),
    "bad chunk size": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Transfer-Encoding: chunked\r\n\r\n", b"zz\r\n{}\r\n0\r\n\r\n"), 400),
    "chunk size overflow": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Transfer-Encoding: chunked\r\n\r\n", b"1" * 40 + b"\r\n"), 400),
    "chunk without its CRLF": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Transfer-Encoding: chunked\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"), 400),
    "absolute-form target": (_req("DELETE http://127.0.0.1/api/delete HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n"), 400),
    "no Host in HTTP/1.1": (_req(f"GET {PROBE} HTTP/1.1\r\n{{AUTH}}\r\n"), 400),
    "two Host headers": (_req(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\nHost: y\r\n{{AUTH}}\r\n"), 400),
    "HTTP/2.0": (_req(f"GET {PROBE} HTTP/2.0\r\nHost: x\r\n{{AUTH}}\r\n"), 505),
    "HTTP/0.9": (_req(f"GET {PROBE}\r\n\r\n"), 400),
    "not HTTP": (_req("hello there\r\n\r\n"), 400),
    "Expect other than 100-continue": (_req(f"POST {PROBE} HTTP/1.1\r\nHost: x\r\n{{AUTH}}Expect: 200-ok\r\nContent-Length: 2\r\n\r\n", b"{}"), 417),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_clean_4xx_and_the_gate_serves_on(stack: Stack, case: str) -> None:
    build, expected = BAD[case]
    answer = raw(stack.gate_port, build(stack))  # returns once the gate closed the connection
    assert status_of(answer) == expected, answer[:300]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and "error" in json.loads(body)
    assert_gate_serves(stack)
    assert not gin_lines(stack, PROBE) and not gin_lines(stack, "/api/delete"), "a refused request reached ollama"


def test_a_request_pipelined_behind_a_valid_one_is_checked_on_its_own(stack: Stack) -> None:
    delete = b'DELETE /api/delete HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n{"model":"tiny"}'
    answer = raw(stack.gate_port, f"GET /api/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.alice}\r\n\r\n".encode() + delete)
    assert [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)] == [200, 401]
    answer = raw(stack.gate_port, f"GET /api/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.alice}\r\n\r\n".encode()
                 + delete.replace(b"Host: x\r\n", f"Host: x\r\nAuthorization: Bearer {stack.alice}\r\n".encode()))
    assert [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)] == [200, 403]
    assert tags(stack) == ["tiny:latest"]
    # A chunked body is re-framed by the gate, and the next request on the connection still works.
    body = json.dumps(GENERATE).encode()
    answer = raw(stack.gate_port, f"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.alice}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode() + chunk(body[:10]) + chunk(body[10:]) + b"0\r\n\r\n"
                 + f"GET /api/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.alice}\r\nConnection: close\r\n\r\n".encode())
    assert [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)] == [200, 200] and b'"version":"0.5.7"' in answer


def test_slow_headers_are_cut_off_and_small_body_limits_hold(stack: Stack, private_gate) -> None:
    port = private_gate(stack.ollama_port, "--header-timeout", "1", "--max-body", "1K")
    # Slowloris: a header line every 0.25 s never completes the head.
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    sock.sendall(f"GET {PROBE} HTTP/1.1\r\nHost: x\r\n".encode())
    received = b""
    try:
        for n in range(40):
            time.sleep(0.25)
            sock.sendall(b"X-%d: a\r\n" % n)
    except OSError:
        pass
    try:
        while more := sock.recv(65536):
            received += more
    except OSError:
        pass
    took = time.monotonic() - started
    sock.close()
    assert 0.9 < took < 4, took
    assert not received or status_of(received) == 408
    # A connection that says nothing.
    answer = raw(port, b"")
    assert status_of(answer) == 408
    # Bodies over the limit, announced or chunked.
    assert status_of(raw(port, f"POST {PROBE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.alice}\r\n"
                               "Content-Length: 1025\r\n\r\n".encode() + b"x" * 1025)) == 413
    answer = raw(port, f"POST {PROBE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.alice}\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n".encode() + chunk(b"x" * 600) + chunk(b"x" * 600) + b"0\r\n\r\n")
    assert status_of(answer) == 413
    assert status_of(raw(port, f"POST /api/show HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.alice}\r\n"
                               "Content-Length: 16\r\nConnection: close\r\n\r\n{\"model\":\"tiny\"}".encode())) == 200
    assert_gate_serves(stack, port)


def test_an_ipv6_listen_address_in_brackets(stack: Stack, private_gate) -> None:
    if not socket.has_ipv6:
        pytest.fail("no IPv6 in this Python")
    port = private_gate(stack.ollama_port, listen=f"[::1]:{free_port()}")
    status, _, body = request(port, "GET", "/api/version", key=stack.alice, host="::1")
    assert status == 200 and json.loads(body) == {"version": "0.5.7"}
    assert request(port, "GET", "/api/version", host="::1")[0] == 401


def test_the_upstream_must_be_loopback_and_addresses_parse(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    add_key(str(keys), "a")
    assert gate_module.main(["--listen", "127.0.0.1:0", "--upstream", "192.0.2.7:11434", "--keys", str(keys)]) == 2
    assert "must be a loopback address" in capsys.readouterr().err
    assert gate_module.main(["--listen", "::1:8080", "--keys", str(keys)]) == 2
    assert "needs brackets" in capsys.readouterr().err
    assert gate_module.parse_hostport("[::1]:8080") == ("::1", 8080)
    assert gate_module.parse_hostport("0.0.0.0:6006") == ("0.0.0.0", 6006)
    assert gate_module.parse_hostport("[::]:6006") == ("::", 6006)


def test_serve_gate_in_process_stops_on_its_event(stack: Stack) -> None:
    stop = threading.Event()
    bound: list[tuple[str, int]] = []
    thread = threading.Thread(target=gate_module.serve_gate, args=("127.0.0.1", 0, stack.ollama_port, str(stack.keys), stop),
                              kwargs={"ready": lambda host, port: bound.append((host, port)), "access_log": False}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not bound:
        assert time.monotonic() < deadline and thread.is_alive(), "serve_gate did not start"
        time.sleep(0.01)
    port = bound[0][1]
    assert request(port, "GET", "/api/version", key=stack.alice)[0] == 200
    assert request(port, "GET", "/api/version")[0] == 401
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_connections_over_the_limit_get_503_and_the_gate_recovers(stack: Stack, private_gate) -> None:
    port = private_gate(stack.ollama_port, "--max-connections", "2", "--header-timeout", "60")
    def held(sock: socket.socket) -> bool:
        """Still open and unanswered: the gate counts it (a refused one got a 503 and was closed)."""
        sock.setblocking(False)
        try:
            sock.recv(1, socket.MSG_PEEK)
            return False
        except BlockingIOError:
            return True
        finally:
            sock.setblocking(True)

    idle: list[socket.socket] = []
    deadline = time.monotonic() + 30
    while True:
        # Two idle connections the gate holds (one may have been refused while
        # an earlier connection, wait_port's, was still being let go).
        for sock in [s for s in idle if not held(s)]:
            idle.remove(sock)
            sock.close()
        while len(idle) < 2:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.2)
        if not all(held(s) for s in idle):
            continue
        answer = raw(port, b"GET /api/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if status_of(answer) == 503:
            break
        assert status_of(answer) == 401 and time.monotonic() < deadline, answer[:200]
    assert b"connection limit" in answer
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 10
    while True:  # the two connections' workers notice the close
        try:
            status = request(port, "GET", "/api/version", key=stack.alice)[0]
        except OSError:
            status = 0
        if status == 200:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
