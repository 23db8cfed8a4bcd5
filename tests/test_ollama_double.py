"""The ollama double behaves like ollama v0.5.7 where builder touches it.

The double runs as a subprocess (as it does in the test image), with only the
standard library (`python -I -S`), on a free loopback port and a temporary
OLLAMA_MODELS; everything is checked through real HTTP and the CLI.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port

from builder.modelfile import render_modelfile
from tests.doubles.modelfile_parser import parse_modelfile as reference_parse

DOUBLE = Path(__file__).resolve().parent / "doubles" / "ollama_double.py"
PYTHON = [sys.executable, "-I", "-S"]  # no site-packages: the double must need only the standard library
MODEL_MT = "application/vnd.ollama.image.model"


def load_double():
    spec = importlib.util.spec_from_file_location("ollama_double", DOUBLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


od = load_double()




def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gguf_bytes(architecture: str = "llama", file_type: int = 15) -> bytes:
    """A small but well-formed GGUF v3 header: three key/values and one 4x8 tensor."""

    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    kvs = [
        string("general.architecture") + struct.pack("<I", 8) + string(architecture),
        string("general.name") + struct.pack("<I", 8) + string("tiny test model"),
        string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", file_type),
    ]
    tensor = string("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 8) + struct.pack("<IQ", 0, 0)
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + tensor
    padding = -len(header) % 32
    return header + b"\0" * padding + b"\0" * (4 * 8 * 4)  # the 4x8 f32 tensor, nothing after it


def env_for(host: str, models: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update(OLLAMA_HOST=host, OLLAMA_MODELS=str(models), HOME=str(models.parent))
    env.update(extra)
    return env


class Server:
    """`ollama serve` from the double on a free port."""

    def __init__(self, models: Path, **extra_env: str):
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.base = f"http://{self.host}"
        self.models = models
        self.env = env_for(self.host, models, **extra_env)
        self.log = models.parent / f"serve-{self.port}.log"  # a file, not a pipe that could fill up
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([*self.command(), "serve"], env=self.env, stdout=log, stderr=log)
        self.http = httpx.Client(base_url=self.base, timeout=10)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited early: {self.log.read_text()}")
            try:
                if self.http.get("/").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("serve never answered")
            time.sleep(0.01)

    def command(self) -> list[str]:
        return [*PYTHON, str(DOUBLE)]

    def cli(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command(), *args], env=self.env, capture_output=True, text=True, timeout=30, cwd=cwd)

    def stop(self) -> tuple[int, str]:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=10)
        return self.process.returncode, self.log.read_text()


MODELFILE = '''# written like builder's Modelfile
FROM ./model.gguf
PARAMETER temperature 0.6
PARAMETER num_ctx 4096
PARAMETER stop "<|end|>"
PARAMETER stop "<|user|>"
TEMPLATE """{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|end|>"""
SYSTEM """You are tiny."""
'''


@pytest.fixture(scope="module")
def created(tmp_path_factory):
    """One server for the module and one model on it, `tiny`, made by `ollama create`
    from a Modelfile. Tests that share it use their own names and blobs."""
    root = tmp_path_factory.mktemp("created")
    work = root / "work"
    work.mkdir()
    (work / "model.gguf").write_bytes(gguf_bytes())
    (work / "Modelfile").write_text(MODELFILE, encoding="utf-8")
    srv = Server(root / "models")
    result = srv.cli("create", "tiny", "-f", str(work / "Modelfile"), cwd=root)  # FROM is relative to the Modelfile
    yield srv, result, work
    srv.stop()


@pytest.fixture
def server(created):
    return created[0]


# --- HTTP basics ----------------------------------------------------------


def test_root_version_and_unknown_paths(server) -> None:
    root = server.http.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert "double" in root.headers["server"]
    assert server.http.head("/").status_code == 200
    version = server.http.get("/api/version")
    assert version.json() == {"version": "0.5.7"}
    assert version.headers["content-type"].startswith("application/json")
    missing = server.http.get("/api/nothing")
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    assert server.http.head("/api/tags").status_code == 200


def test_version_flag_names_the_double(tmp_path, server) -> None:
    alone = subprocess.run([*PYTHON, str(DOUBLE), "--version"], env=env_for(f"127.0.0.1:{free_port()}", tmp_path / "m"),
                           capture_output=True, text=True, timeout=30)
    assert alone.returncode == 0
    assert "Warning: client version is 0.5.7" in alone.stdout and "double" in alone.stdout
    with_server = server.cli("-v")
    assert with_server.returncode == 0
    assert with_server.stdout.splitlines()[0] == "ollama version is 0.5.7"
    assert "double" in with_server.stdout


def test_double_is_one_standard_library_file() -> None:
    text = DOUBLE.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env python3\n")
    assert "DOUBLE" in ast.get_docstring(ast.parse(text))
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


# --- create through the CLI, and what it leaves on disk ----------------------


def test_create_prints_ollamas_statuses(created) -> None:
    _srv, result, work = created
    assert result.returncode == 0, result.stderr
    digest = "sha256:" + sha256_hex((work / "model.gguf").read_bytes())
    lines = result.stderr.splitlines()
    for expected in ("gathering model components", f"copying file {digest} 100%", "parsing GGUF",
                     f"using existing layer {digest}", "writing manifest", "success"):
        assert expected in lines, (expected, lines)
    assert sum(line.startswith("creating new layer sha256:") for line in lines) == 3  # template, system, params
    assert lines[-1] == "success"


@pytest.mark.parametrize("extra,error", [(32, "invalid file magic"), (2, "unexpected EOF")])
def test_a_gguf_with_bytes_after_its_last_tensor_fails_create_like_ollama_0_5_7(created, tmp_path, extra, error) -> None:
    # ggufLayers reuses the blob only when the GGUF decodes to the file's
    # length; otherwise it copies the decoded part and decodes again from
    # there: padding after the last tensor (llama-gguf-split writes it when
    # that tensor's size is not a multiple of 32) is no GGUF magic. Seen with
    # a real ollama 0.5.7 built from source: "Error: invalid file magic",
    # "Error: unexpected EOF" under 4 bytes, and the copy left in blobs/.
    srv, _result, _work = created
    padded = gguf_bytes() + b"\0" * extra
    model = tmp_path / "padded.gguf"
    model.write_bytes(padded)
    (tmp_path / "Modelfile").write_text("FROM ./padded.gguf\n", encoding="utf-8")
    result = srv.cli("create", "padded", "-f", str(tmp_path / "Modelfile"), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.rstrip().endswith(f"Error: {error}"), result.stderr
    assert not (srv.models / "manifests" / "registry.ollama.ai" / "library" / "padded").exists()
    assert (srv.models / "blobs" / f"sha256-{sha256_hex(padded)}").is_file()  # the upload
    assert (srv.models / "blobs" / f"sha256-{sha256_hex(gguf_bytes())}").is_file()  # the copy of the decoded part


def test_create_lays_out_blobs_and_manifest_like_ollama(created) -> None:
    srv, _result, work = created
    model_hex = sha256_hex((work / "model.gguf").read_bytes())
    blobs = srv.models / "blobs"
    model_blob = blobs / f"sha256-{model_hex}"
    assert model_blob.read_bytes() == (work / "model.gguf").read_bytes()
    path = srv.models / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    raw = path.read_bytes()
    assert raw.endswith(b"}\n") and b" " not in raw.strip()  # compact, one trailing newline
    manifest = json.loads(raw)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    kinds = [layer["mediaType"].rsplit(".", 1)[1] for layer in manifest["layers"]]
    assert kinds == ["model", "template", "system", "params"]
    model_layer = manifest["layers"][0]
    assert model_layer["digest"] == f"sha256:{model_hex}"
    assert model_layer["from"] == str(model_blob)
    for layer in [manifest["config"], *manifest["layers"]]:
        blob = blobs / layer["digest"].replace(":", "-")
        assert blob.stat().st_size == layer["size"]
        assert sha256_hex(blob.read_bytes()) == layer["digest"].split(":")[1]
    read = {layer["mediaType"].rsplit(".", 1)[1]: (blobs / layer["digest"].replace(":", "-")).read_bytes() for layer in manifest["layers"]}
    assert read["template"] == b"{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|end|>"
    assert read["system"] == b"You are tiny."
    # a Go map: keys sorted, compact, HTML characters escaped, typed values
    assert read["params"] == b'{"num_ctx":4096,"stop":["\\u003c|end|\\u003e","\\u003c|user|\\u003e"],"temperature":0.6}\n'
    config = json.loads((blobs / manifest["config"]["digest"].replace(":", "-")).read_bytes())
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer["digest"] for layer in manifest["layers"]]}
    assert (config["model_format"], config["model_family"], config["file_type"], config["os"]) == ("gguf", "llama", "Q4_K_M", "linux")


def test_tags_lists_the_model(created) -> None:
    srv, _result, _work = created
    (model,) = [m for m in srv.http.get("/api/tags").json()["models"] if m["name"] == "tiny:latest"]
    path = srv.models / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest = json.loads(path.read_bytes())
    assert model["name"] == model["model"] == "tiny:latest"
    assert model["digest"] == sha256_hex(path.read_bytes())
    assert model["size"] == manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    assert model["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                                "parameter_size": "32", "quantization_level": "Q4_K_M"}
    assert model["modified_at"][:4].isdigit() and "T" in model["modified_at"]
    listing = srv.cli("list")
    assert listing.returncode == 0
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert ["tiny:latest", model["digest"][:12]] in [row.split()[:2] for row in rows]


def test_show_answers_like_ollama(created) -> None:
    srv, _result, work = created
    assert srv.http.post("/api/show", json={"model": "nope"}).json() == {"error": "model 'nope' not found"}
    assert srv.http.post("/api/show", json={"model": "nope"}).status_code == 404
    assert srv.http.post("/api/show", json={}).status_code == 400
    response = srv.http.post("/api/show", json={"model": "tiny"})
    assert response.status_code == 200
    show = response.json()
    blob = srv.models / "blobs" / f"sha256-{sha256_hex((work / 'model.gguf').read_bytes())}"
    assert show["modelfile"].startswith('# Modelfile generated by "ollama show"\n'
                                        "# To build a new Modelfile based on this, replace FROM with:\n"
                                        "# FROM tiny:latest\n\n"
                                        f"FROM {blob}\n")
    assert "TEMPLATE {{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|end|>\n" in show["modelfile"]
    assert "PARAMETER temperature 0.6\n" in show["modelfile"] and "PARAMETER stop <|user|>\n" in show["modelfile"]
    assert show["parameters"].splitlines() == [
        "num_ctx                        4096",
        'stop                           "<|end|>"',
        'stop                           "<|user|>"',
        "temperature                    0.6",
    ]
    assert show["system"] == "You are tiny."
    assert show["template"].endswith("<|end|>")
    assert show["details"]["parent_model"] == str(blob)
    assert show["model_info"] == {"general.architecture": "llama", "general.file_type": 15, "general.parameter_count": 32}
    assert "modified_at" in show
    cli = srv.cli("show", "tiny", "--modelfile")
    assert (cli.returncode, cli.stdout) == (0, show["modelfile"] + "\n")
    missing = srv.cli("show", "nope")
    assert (missing.returncode, missing.stderr) == (1, "Error: model 'nope' not found\n")


def test_generate_of_a_missing_model_is_404(created) -> None:
    # Real inference (and the module's model, a bare header ollama would
    # panic on) is in test_ollama_double_inference.py.
    srv, _result, _work = created
    missing = srv.http.post("/api/generate", json={"model": "nope", "prompt": "x"})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope' not found"})
    assert srv.http.post("/api/chat", json={"model": "nope", "messages": []}).status_code == 404


def test_create_refuses_unknown_parameters(created, tmp_path) -> None:
    srv, _result, work = created
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {work / 'model.gguf'}\nPARAMETER numa true\n", encoding="utf-8")
    result = srv.cli("create", "other", "-f", str(modelfile))
    assert (result.returncode, result.stderr.splitlines()[-1]) == (1, "Error: unknown parameter 'numa'")


def test_create_without_a_server_cannot_connect(tmp_path) -> None:
    (tmp_path / "Modelfile").write_text("FROM ./m.gguf\n", encoding="utf-8")
    result = subprocess.run([*PYTHON, str(DOUBLE), "create", "x", "-f", str(tmp_path / "Modelfile")],
                            env=env_for(f"127.0.0.1:{free_port()}", tmp_path / "models"), capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (1, "Error: could not connect to ollama app, is it running?\n")


# --- blobs and the create API ------------------------------------------------


def test_blob_head_post_and_mismatch(server) -> None:
    data = b"GGUF" + b"some bytes" * 100
    digest = "sha256:" + sha256_hex(data)
    assert server.http.head(f"/api/blobs/{digest}").status_code == 404
    assert server.http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert server.http.head(f"/api/blobs/{digest}").status_code == 200
    assert (server.models / "blobs" / digest.replace(":", "-")).read_bytes() == data
    other = b"other bytes"
    claimed = "sha256:" + "0" * 64
    mismatch = server.http.post(f"/api/blobs/{claimed}", content=other)
    real = "sha256:" + sha256_hex(other)
    assert mismatch.status_code == 400
    assert mismatch.json() == {"error": f'digest mismatch, expected "{claimed}", got "{real}"'}
    assert (server.models / "blobs" / real.replace(":", "-")).read_bytes() == other  # kept, as ollama does
    assert not (server.models / "blobs" / claimed.replace(":", "-")).exists()
    bad = server.http.post("/api/blobs/sha256:123", content=b"x")
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid digest format"})


def test_posting_a_known_blob_does_not_read_the_body(server) -> None:
    data = b"GGUF known"
    digest = "sha256:" + sha256_hex(data)
    assert server.http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        # a terabyte announced, a few bytes sent: only an unread body gets an answer now
        sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\nGGUF".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_create_api_errors(server) -> None:
    junk = b"not a gguf at all"
    digest = "sha256:" + sha256_hex(junk)
    server.http.post(f"/api/blobs/{digest}", content=junk)
    refused = server.http.post("/api/create", json={"model": "bad", "files": {"m.gguf": digest}, "stream": False})
    assert (refused.status_code, refused.json()) == (400, {"error": "supplied file was not in GGUF format"})
    neither = server.http.post("/api/create", json={"model": "bad", "stream": False})
    assert (neither.status_code, neither.json()) == (400, {"error": "neither 'from' or 'files' was specified"})
    streamed = server.http.post("/api/create", json={"model": "bad", "files": {"m.gguf": digest}})
    assert streamed.status_code == 200  # errors arrive in the stream
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert lines == [{"status": "parsing GGUF"}, {"error": "supplied file was not in GGUF format", "status": 400}]
    assert not (server.models / "manifests" / "registry.ollama.ai" / "library" / "bad").exists()


def test_create_api_accepts_any_gguf_magic_and_delete_removes_it(server) -> None:
    blob = b"GGUF" + os.urandom(256)  # only the magic is right
    digest = "sha256:" + sha256_hex(blob)
    assert server.http.post(f"/api/blobs/{digest}", content=blob).status_code == 201
    made = server.http.post("/api/create", json={"name": "junk:v1", "files": {"j.gguf": digest}, "stream": False})
    assert (made.status_code, made.json()) == (200, {"status": "success"})
    models = {model["name"]: model for model in server.http.get("/api/tags").json()["models"]}
    assert models["junk:v1"]["details"]["family"] == "unknown"
    removed = server.cli("rm", "junk:v1")
    assert (removed.returncode, removed.stdout) == (0, "deleted 'junk:v1'\n")
    assert "junk:v1" not in [model["name"] for model in server.http.get("/api/tags").json()["models"]]
    assert server.http.head(f"/api/blobs/{digest}").status_code == 404  # its layers went with it
    gone = server.http.request("DELETE", "/api/delete", json={"model": "junk:v1"})
    assert (gone.status_code, gone.json()) == (404, {"error": "model 'junk:v1' not found"})


# --- start-up pruning and signals --------------------------------------------


def seed_store(models: Path) -> dict[str, str]:
    """A store with one model (config + model layer), an unused blob, a partial and a colon-named blob."""
    blobs = models / "blobs"
    blobs.mkdir(parents=True)
    names = {}
    for key, data in (("model", b"GGUF model"), ("config", b'{"model_format":"gguf"}\n'), ("unused", b"nobody"), ("colon", b"old name")):
        names[key] = sha256_hex(data)
        (blobs / f"sha256-{names[key]}").write_bytes(data)
    (blobs / f"sha256-{names['colon']}").rename(blobs / f"sha256:{names['colon']}")
    (blobs / f"sha256-{names['unused']}-partial").write_bytes(b"half")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": f"sha256:{names['config']}", "size": 23},
                "layers": [{"mediaType": MODEL_MT, "digest": f"sha256:{names['model']}", "size": 10},
                           {"mediaType": "application/vnd.ollama.image.system", "digest": f"sha256:{names['colon']}", "size": 8}]}
    path = models / "manifests" / "registry.ollama.ai" / "library" / "kept" / "latest"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest) + "\n")
    return names


def test_start_prunes_unreferenced_blobs(tmp_path) -> None:
    models = tmp_path / "models"
    names = seed_store(models)
    srv = Server(models)
    code, log = srv.stop()
    remaining = sorted(p.name for p in (models / "blobs").iterdir())
    assert remaining == sorted(f"sha256-{names[k]}" for k in ("model", "config", "colon"))
    assert "total unused blobs removed: 1" in log and f"sha256-{names['unused']}" in log
    assert code == 0


def test_noprune_keeps_every_blob(tmp_path) -> None:
    models = tmp_path / "models"
    names = seed_store(models)
    srv = Server(models, OLLAMA_NOPRUNE="1")
    code, log = srv.stop()
    remaining = sorted(p.name for p in (models / "blobs").iterdir())
    # fixBlobs renames sha256:HEX even so; nothing is deleted
    assert remaining == sorted([*(f"sha256-{names[k]}" for k in ("model", "config", "unused", "colon")), f"sha256-{names['unused']}-partial"])
    assert "total unused blobs" not in log
    assert code == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_serve_cleanly(tmp_path, signum) -> None:
    srv = Server(tmp_path / "models")
    srv.process.send_signal(signum)
    assert srv.process.wait(timeout=5) == 0
    srv.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.base + "/", timeout=1)


# --- pure pieces: the Modelfile parser, parameters, OLLAMA_HOST ---------------


NASTY = ['plain', 'say "hi"', "$HOME and ${PATH}", "{{ .Prompt }}", "back\\slash", "tab\there", "<｜User｜>",
         "line one\nline two", '"quoted at both ends"', "  padded  "]


@pytest.mark.parametrize("value", NASTY)
def test_embedded_parser_agrees_with_the_reference_parser(value: str) -> None:
    text = render_modelfile("/models/m.gguf", [("stop", ("<|end|>", 'a "b"')), ("temperature", 0.6)], value, value, "header")
    expected = [("model" if name == "from" else name, args) for name, args in reference_parse(text)]
    got = [(name, args) if name in ("model", "template", "system") else ("parameter", f"{name} {args}") for name, args in od.parse_modelfile(text)]
    assert got == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM     FOOO BAR    \n", [("model", "FOOO BAR")]),
        ("from x\nPARAMETER what the \n", [("model", "x"), ("what", "the")]),
        ('FROM x\nPARAMETER stop "a \\" b"\n', [("model", "x"), ("stop", 'a \\" b')]),
        ('FROM x\nSYSTEM """\nThis is a\nmultiline system.\n"""\n', [("model", "x"), ("system", "\nThis is a\nmultiline system.\n")]),
        ("FROM x\nMESSAGE user hi there\n", [("model", "x"), ("message", "user: hi there")]),
        ("# c\nFROM x # not a comment\n", [("model", "x # not a comment")]),
    ],
)
def test_embedded_parser_follows_ollamas_rules(text: str, expected: list) -> None:
    assert od.parse_modelfile(text) == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("FROM x\nBOGUS y\n", '(line 2): command must be one of "from", "license", "template", "system", "adapter", "parameter", or "message"'),
        ("SYSTEM hi\n", "no FROM line"),
        ("FROM x\nPARAMETER x\n", "unexpected EOF: x"),
        ('FROM x\nSYSTEM "abc" x\n', "unexpected EOF"),
        ("FROM x\nMESSAGE bot hi\n", '(line 2): message role must be one of "system", "user", or "assistant"'),
    ],
)
def test_embedded_parser_errors(text: str, error: str) -> None:
    with pytest.raises(od.OllamaError) as caught:
        od.parse_modelfile(text)
    assert caught.value.message == error


def test_parameters_are_typed_like_format_params() -> None:
    commands = od.parse_modelfile("FROM /nowhere/m.gguf\nPARAMETER temperature 0.7\nPARAMETER num_ctx 1000000\n"
                                  "PARAMETER use_mmap false\nPARAMETER stop a\nPARAMETER stop b\n")
    request = od.create_request(commands, "/")
    assert request["from"] == "/nowhere/m.gguf"
    assert od.go_json(od.go_map(request["parameters"])) == '{"num_ctx":1000000,"stop":["a","b"],"temperature":0.7,"use_mmap":false}'
    for name, value, error in (("num_ctx", "1e3", "invalid int value [1e3]"), ("top_p", "x", "invalid float value [x]"),
                               ("low_vram", "yes", "invalid bool value [yes]"), ("tfs_z", "1", "unknown parameter 'tfs_z'")):
        with pytest.raises(od.OllamaError, match=r"^" + __import__("re").escape(error) + "$"):
            od.format_param(name, value)
    assert od.go_v(1000000.0) == "1e+06" and od.go_v(0.7) == "0.7" and od.go_v(4096.0) == "4096"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("http", "127.0.0.1", 11434)),
        ("0.0.0.0:1234", ("http", "0.0.0.0", 1234)),
        (":5000", ("http", "", 5000)),
        ("http://host:7", ("http", "host", 7)),
        ("http://example.com", ("http", "example.com", 80)),
        ("example.com", ("http", "example.com", 11434)),
        ('"127.0.0.1:99"', ("http", "127.0.0.1", 99)),
    ],
)
def test_ollama_host_is_read_like_envconfig(monkeypatch, value: str, expected: tuple) -> None:
    monkeypatch.setenv("OLLAMA_HOST", value)
    assert od.ollama_host() == expected


def test_serve_binds_a_port_only_host(tmp_path) -> None:
    port = free_port()
    env = env_for(f":{port}", tmp_path / "models")
    process = subprocess.Popen([*PYTHON, str(DOUBLE), "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/api/tags", timeout=1).json() == {"models": []}
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
    assert process.returncode == 0
