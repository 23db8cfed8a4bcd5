"""`--target host`: the whole path as ordinary processes on this machine, no
container engine (the rented-GPU-container case). Release archives from a
server on 127.0.0.1, carried in for an offline run too; the ollama double's
runner is real llama.cpp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.engine.conftest import LLAMA_PATH, OLLAMA_PATH
from tests.fixtures.artifact_server import ArtifactServer
from tests.fixtures.llama_cpp_release import llama_cpp_bin_dir, llama_cpp_release_zip
from tests.fixtures.ollama_release import ollama_release_tgz
from tests.helpers import free_port, run_builder
from tests.test_sample_model import greedy

PROMPT = "Why is the sky blue?"




def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


class HostProject:
    def __init__(self, root: Path, server: ArtifactServer):
        self.root = root
        self.port = free_port()
        assert run_builder("init", "--preset", "tiny", cwd=root).returncode == 0
        config = root / "builder.yaml"
        config.write_text(config.read_text() + (
            "target: host\nhost:\n  prefix: ./prefix\n"
            f"ollama:\n  url: {server.url}/ollama/ollama/releases/download/v{{version}}/ollama-linux-amd64.tgz\n"
            f"llama_cpp:\n  url: {server.url}/ggml-org/llama.cpp/releases/download/{{build}}/llama-{{build}}-bin-ubuntu-x64.zip\n"
        ))
        self.env = {"BUILDER_SERVE_PORT": str(self.port), "BUILDER_CACHE_DIR": str(root / "cache"), "NO_PROXY": "127.0.0.1"}
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = root / "prefix"

    def builder(self, *args: str, timeout: int = 300):
        return run_builder(*args, cwd=self.root, env=self.env, timeout=timeout)

    def use_current_ollama(self, carried: Path) -> Path:
        """Switch the config to ollama 0.32.15 and carry its archive (the
        double's) and llama.cpp's into `carried`, for `up --offline --from`."""
        import yaml

        from tests.fixtures.llama_cpp_release import llama_cpp_release_zip
        from tests.fixtures.ollama_release import ollama_release_tar_zst

        config = self.root / "builder.yaml"
        data = yaml.safe_load(config.read_text())
        data["ollama"] = {"version": "0.32.15"}
        config.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        carried.mkdir(exist_ok=True)
        (carried / "ollama-linux-amd64.tar.zst").write_bytes(ollama_release_tar_zst("0.32.15"))
        (carried / "llama-b4610-bin-ubuntu-x64.zip").write_bytes(llama_cpp_release_zip().read_bytes())
        return carried

    def pid(self) -> int:
        return json.loads((self.prefix / "run" / "serve.pid").read_text())["pid"]


@pytest.fixture
def project(tmp_path: Path):
    server = ArtifactServer(files={OLLAMA_PATH: ollama_release_tgz(), LLAMA_PATH: llama_cpp_release_zip().read_bytes()}).start()
    project = HostProject(tmp_path, server)
    yield project
    project.builder("down")
    server.stop()


def test_host_target_serves_without_an_engine(project: HostProject) -> None:
    assert project.builder("sample-model").returncode == 0
    env_without_engine = {"DOCKER_HOST": f"unix://{project.root}/no-engine.sock"}
    project.env.update(env_without_engine)  # any use of an engine would fail loudly
    result = project.builder("up")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"{project.url} serves tiny:latest"
    assert "load: tiny:latest loaded in " in result.stderr
    # As compose shows steps: the supervisor's own lines indented under their
    # step, no progress lines in a log, one `done` line per step.
    lines = result.stderr.splitlines()
    assert not [l for l in lines if l.startswith("supervisor:") or l.strip().endswith("%")], result.stderr
    assert [l.split(":")[0] for l in lines if l.endswith(" s") and ": done in " in l] == ["merge", "create"], result.stderr
    assert "  merge: joining 3 shards" in result.stderr
    merged = project.root / "models" / "tiny" / "tiny.gguf"
    expected, _ = greedy(llama_cpp_bin_dir(), merged, PROMPT, 8)
    answer = post(f"{project.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
    assert (answer["response"], answer["eval_count"]) == (expected, 8)
    # Only the prefix, the storage and the cache were written.
    assert sorted(p.name for p in project.root.iterdir()) == ["builder.lock", "builder.yaml", "cache", "models", "prefix"]

    status = json.loads(project.builder("status", "--json").stdout)
    assert status["target"] == "host" and status["model_listed"] is True and status["loaded"]["size"] > 0
    assert status["services"]["serve"]["state"] == "running" and status["services"]["serve"]["restarts"] == 0
    assert status["services"]["merge"]["state"] == "done" and status["services"]["create"]["state"] == "done"
    lines = project.builder("status").stdout.splitlines()
    assert lines[0] == f"prefix    {project.prefix} (no image: the host target runs without a container engine)", lines
    model_line = next(line for line in lines if line.startswith("model "))
    assert model_line.startswith("model     loaded: ") and ", on the CPU (gpus: none), kept loaded" in model_line, model_line
    first = project.pid()

    again = project.builder("up")
    assert again.returncode == 0, again.stderr
    assert f"serve: already running with this config (pid {first})" in again.stderr
    assert project.pid() == first

    logs = project.builder("logs")
    assert "supervisor: serve: starting" in logs.stdout and "serve: tiny:latest loaded in" in logs.stdout

    # ollama dies: the supervisor brings it back and counts it.
    children = [int(p) for p in (Path(f"/proc/{first}/task/{first}/children").read_text().split())]
    assert children, "the supervisor runs ollama as its child"
    os.kill(children[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while json.loads(project.builder("status", "--json").stdout)["services"]["serve"].get("restarts", 0) < 1:
        assert time.monotonic() < deadline, "no restart was counted"
        time.sleep(0.5)
    deadline = time.monotonic() + 60
    while not json.loads(project.builder("status", "--json").stdout)["model_listed"]:
        assert time.monotonic() < deadline, "ollama did not come back"
        time.sleep(0.5)

    down = project.builder("down")
    assert down.returncode == 0, down.stderr
    assert not Path(f"/proc/{first}").exists() or Path(f"/proc/{first}/stat").read_text().split()[2] == "Z"
    assert merged.is_file(), "down keeps the model"
    assert json.loads(project.builder("status", "--json").stdout)["services"]["serve"] == {"state": "absent"}


def test_a_stale_pid_file_is_not_trusted(project: HostProject) -> None:
    assert project.builder("sample-model").returncode == 0
    assert project.builder("up", "--no-load").returncode == 0
    first = project.pid()
    assert project.builder("down").returncode == 0
    # A pid file naming a live process that is not ours (this test's own pid).
    run = project.prefix / "run"
    (run / "serve.pid").write_text(json.dumps({"pid": os.getpid(), "start_time": 1, "config": "x"}))
    assert json.loads(project.builder("status", "--json").stdout)["services"]["serve"] == {"state": "absent"}
    result = project.builder("up")
    assert result.returncode == 0, result.stderr
    assert project.pid() not in (os.getpid(), first)


def test_offline_from_carried_archives(project: HostProject, tmp_path: Path) -> None:
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "ollama-linux-amd64.tgz").write_bytes(ollama_release_tgz())
    (carried / "llama-b4610-bin-ubuntu-x64.zip").write_bytes(llama_cpp_release_zip().read_bytes())
    assert project.builder("sample-model").returncode == 0
    result = project.builder("up", "--offline", "--from", str(carried))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "load: tiny:latest loaded in " in result.stderr


def test_current_ollama_from_a_carried_tar_zst_creates_from_the_shards(project: HostProject, tmp_path: Path) -> None:
    """The issue's "done when" on the host target: ollama 0.32.15's .tar.zst carried
    in, no merge step, no unreferenced blob, answers from real llama.cpp."""
    from tests.fixtures.ollama_release import ollama_release_tar_zst

    config = project.root / "builder.yaml"
    text = config.read_text()
    start = text.index("ollama:\n")
    end = text.index("llama_cpp:\n")
    config.write_text(text[:start] + "ollama:\n  version: 0.32.15\n" + text[end:])
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "ollama-linux-amd64.tar.zst").write_bytes(ollama_release_tar_zst("0.32.15"))
    (carried / "llama-b4610-bin-ubuntu-x64.zip").write_bytes(llama_cpp_release_zip().read_bytes())
    assert project.builder("sample-model").returncode == 0
    space = {c["name"]: c for c in json.loads(project.builder("doctor", "--json").stdout)}["space"]
    assert space["status"] == "ok" and "ollama 0.32.15's create needs " in space["detail"], space
    assert space["detail"].endswith(" at its peak (no merge)"), space
    result = project.builder("up", "--offline", "--from", str(carried))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ollama-linux-amd64.tar.zst: taken from" in result.stderr
    space = {c["name"]: c for c in json.loads(project.builder("doctor", "--json").stdout)}["space"]
    assert space["status"] == "ok" and space["detail"].endswith("free; tiny:latest is already created"), space
    assert "load: tiny:latest loaded in " in result.stderr, result.stderr[-3000:]
    models = project.root / "models"
    assert not (models / "tiny" / "tiny.gguf").exists(), "no merge with ollama 0.30+"
    first_shard = models / "tiny" / "tiny-00001-of-00003.gguf"
    expected, _ = greedy(llama_cpp_bin_dir(), first_shard, PROMPT, 8)
    answer = post(f"{project.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
    assert (answer["response"], answer["eval_count"]) == (expected, 8)
    from builder.supervisor.create import referenced_digests

    store = models / "ollama"
    on_disk = {p.name for p in (store / "blobs").iterdir()}
    assert on_disk == {f"sha256-{d}" for d in referenced_digests(str(store))}, "a blob no manifest references was left"
    status = json.loads(project.builder("status", "--json").stdout)
    created = status["created"]
    assert created["path"] == "shards" and created["inputs"] == 3 and created["written"] > 0
    assert status["services"]["merge"]["state"].startswith("none needed")
    human = project.builder("status").stdout
    assert "created   from 3 shard(s), no merge: ollama wrote " in human
    print(result.stderr)
    assert "nothing is merged" in result.stderr and "ollama rewrote the 3 shard(s) into one blob" in result.stderr
    again = project.builder("up", "--offline", "--from", str(carried))
    assert again.returncode == 0 and "serve: already running with this config" in again.stderr, again.stderr


def test_doctor_on_the_host_target_needs_no_engine(project: HostProject) -> None:
    project.env["DOCKER_HOST"] = f"unix://{project.root}/no-engine.sock"
    assert project.builder("sample-model").returncode == 0
    result = project.builder("doctor", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert "engine" not in checks and "image" not in checks
    assert checks["python"]["status"] == "ok" and checks["prefix"]["status"] == "ok"
    assert checks["gpu"]["detail"] == "not needed (gpus: none)" and checks["shards"]["status"] == "ok"
    assert checks["storage"]["status"] in ("ok", "warn")


def test_proxy_variables_never_reach_loopback(project: HostProject, tmp_path: Path) -> None:
    """AutoDL's network acceleration exports http_proxy: create, the warm-up,
    health and a prompt on 127.0.0.1 must not go through it, whatever no_proxy
    says. The proxy here is a port that refuses every connection."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refusing = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed when the block ends: nothing listens there
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "ollama-linux-amd64.tgz").write_bytes(ollama_release_tgz())
    (carried / "llama-b4610-bin-ubuntu-x64.zip").write_bytes(llama_cpp_release_zip().read_bytes())
    assert project.builder("sample-model").returncode == 0
    project.env.pop("NO_PROXY", None)
    project.env.update(http_proxy=refusing, https_proxy=refusing, HTTP_PROXY=refusing, HTTPS_PROXY=refusing, no_proxy="", ALL_PROXY=refusing)
    result = project.builder("up", "--offline", "--from", str(carried))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "load: tiny:latest loaded in " in result.stderr
    status = json.loads(project.builder("status", "--json").stdout)
    assert status["model_listed"] is True and status["loaded"]
    health = subprocess.run([sys.executable, "-m", "supervisor", "health", "--loaded", "--json"], capture_output=True, text=True,
                            env={**os.environ, **project.env, "PYTHONPATH": str(project.prefix), "BUILDER_RUNTIME": str(project.prefix / "runtime.json"),
                                 "BUILDER_STATE_DIR": str(project.prefix / "run")})
    assert json.loads(health.stdout.strip().splitlines()[-1])["state"] == "loaded", health.stdout + health.stderr
    answer = post(f"{project.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
    assert answer["eval_count"] == 8


def test_down_says_what_it_stopped_and_finds_the_prefix_of_a_broken_config(project: HostProject) -> None:
    """`down` used to print "removed" when nothing ran, and to look in the
    default prefix once the config no longer validated."""
    assert project.builder("sample-model").returncode == 0
    config = project.root / "builder.yaml"
    config.write_text(config.read_text().replace("prefix: ./prefix", "prefix: ./elsewhere"))
    project.prefix = project.root / "elsewhere"
    assert project.builder("up", "--no-load").returncode == 0
    pid = project.pid()
    config.write_text(config.read_text() + "not_a_key: 1\n")  # no longer validates
    assert project.builder("validate").returncode == 2
    down = project.builder("down")
    assert down.returncode == 0 and down.stdout.strip() == f"stopped serve (pid {pid}) of tiny; its files stay in {project.prefix}", down.stdout
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    again = project.builder("down")
    assert again.stdout.strip() == f"nothing to stop: no serve of tiny runs from {project.prefix}"


def test_a_port_another_program_holds_is_refused_not_taken_for_ours(project: HostProject) -> None:
    """A foreign server on serve.port that lists a model of the same name used
    to pass as success; now up refuses before starting serve."""
    import http.server
    import threading

    class ForeignOllama(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps({"models": [{"name": "tiny:latest", "model": "tiny:latest"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    assert project.builder("sample-model").returncode == 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", project.port), ForeignOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = project.builder("up", "--no-load")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: port {project.port} on 127.0.0.1 is taken by another program (not this project's serve); "
                      "stop it (an `ollama serve` of your own?) or set serve.port"], result.stderr
    assert not (project.prefix / "run" / "serve.pid").exists()


def test_status_names_a_failed_load_and_a_model_kept_loaded(project: HostProject) -> None:
    """`status` after the warm-up's load failed says so, with ollama's cause
    (not "the first request loads it"); a model kept loaded (keep_alive -1,
    which /api/ps shows as a date in 2300 or so) reads as such."""
    from tests.fixtures.gguf_edit import edit_metadata

    assert project.builder("sample-model").returncode == 0
    up = project.builder("up")
    assert up.returncode == 0, up.stderr[-3000:]
    text = project.builder("status").stdout
    assert "kept loaded (keep_alive -1)" in text and "until 2" not in text, text
    assert project.builder("down").returncode == 0

    shard = project.root / "models" / "tiny" / "tiny-00001-of-00003.gguf"
    edit_metadata(shard, values={"llama.embedding_length": 32})  # llama.cpp refuses it at load
    failed = project.builder("up")
    assert failed.returncode == 1, failed.stderr[-3000:]
    status = project.builder("status")
    assert "model     not loaded: the supervisor's load failed: llama runner process has terminated: error loading model" in status.stdout, status.stdout
    assert json.loads(project.builder("status", "--json").stdout)["load_failed"].startswith("llama runner process has terminated")
