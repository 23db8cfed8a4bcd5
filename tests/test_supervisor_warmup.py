"""The serve role loads the model once ollama answers, records it for
`health --loaded`, loads it again after an unload, and sizes ollama's limits
to the model. On the host, against the ollama double from the test release
archive (its runner is real llama.cpp)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port

from builder.sample import write_split_model
from builder.supervisor.create import create
from builder.supervisor.merge import merge
from tests.conftest import REPO
from tests.fixtures.ollama_release import unpack_ollama_release
from tests.test_supervisor_create import runtime_for




@pytest.fixture
def stack(tmp_path: Path):
    """A merged and created tiny model, and the environment to serve it."""
    ollama = unpack_ollama_release(tmp_path / "release")
    runtime = runtime_for(tmp_path / "models", ollama)
    write_split_model(tmp_path / "models" / "tiny", "tiny", 3)
    assert merge(runtime) == 0 and create(runtime) == 0
    port = free_port()
    runtime["port"] = port
    (tmp_path / "runtime.json").write_text(json.dumps(runtime))
    env = dict(os.environ, BUILDER_RUNTIME=str(tmp_path / "runtime.json"), BUILDER_STATE_DIR=str(tmp_path),
               OLLAMA_HOST=f"127.0.0.1:{port}", HOME=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(REPO / "builder"), os.environ.get("PYTHONPATH", "")]))
    return tmp_path, env, f"http://127.0.0.1:{port}"


def supervisor(env: dict, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], env=env, capture_output=True, text=True, timeout=60, **kwargs)


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_warm_up_loads_reloads_and_health_loaded_follows(stack) -> None:
    root, env, base = stack
    log = root / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "supervisor", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Before the warm-up (ollama is not even up yet): not loaded.
        early = supervisor(env, "health", "--loaded")
        assert early.returncode == 1
        wait_until(lambda: supervisor(env, "health", "--loaded").returncode == 0, 60, "the warm-up")
        state = json.loads(supervisor(env, "health", "--loaded", "--json").stdout)
        assert state["state"] == "loaded" and state["model"] == "tiny:latest" and state["size"] > 0 and state["size_vram"] == 0
        assert state["load_timeout_s"] == 300
        (entry,) = httpx.get(f"{base}/api/ps").json()["models"]
        assert int(entry["expires_at"][:4]) > 2300, "keep_alive -1: loaded for good"
        # Unloaded behind its back: the warmer loads it again.
        httpx.post(f"{base}/api/generate", json={"model": "tiny", "keep_alive": 0}, timeout=30)
        wait_until(lambda: "is no longer loaded; loading it again" in log.read_text(), 30, "the reload")
        wait_until(lambda: supervisor(env, "health", "--loaded").returncode == 0, 60, "the second load")
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    text = log.read_text()
    assert "serve: OLLAMA_LOAD_TIMEOUT=300s: 0.0 GB read at 200 MB/s takes 1 s; never below ollama's 300 s" in text
    assert "serve: OLLAMA_NUM_PARALLEL=4: the model is not above 16 GiB (serve.parallel: auto); the KV cache is num_ctx x 4" in text
    assert "serve: OLLAMA_MAX_LOADED_MODELS=1: one model per stack" in text
    assert "serve: tiny:latest loaded in " in text


def test_serve_env_wins_over_the_rule_and_a_failed_load_is_recorded(stack) -> None:
    root, env, base = stack
    env = dict(env, OLLAMA_LOAD_TIMEOUT="2s")  # the user's serve.env
    # A model damaged on its storage after create: its last tensor's data is
    # cut off, and llama.cpp (the runner) refuses it at load.
    merged = root / "models" / "tiny" / "tiny.gguf"
    os.truncate(merged, merged.stat().st_size - 4096)
    log = root / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "supervisor", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "failed" in (supervisor(env, "health", "--loaded", "--json").stdout or ""), 60, "the failed load")
        state = json.loads(supervisor(env, "health", "--loaded", "--json").stdout)
        assert state["state"] == "failed", state
        # ollama's wording around llama.cpp's own refusal (llama_model_loader's bounds check).
        assert state["error"].startswith("llama runner process has terminated: "), state
        assert "tensor 'output.weight' data is not within the file bounds" in state["error"], state
        assert state["error"].endswith("(HTTP 500)"), state
        assert supervisor(env, "health", "--loaded").returncode == 1
        assert supervisor(env, "health").returncode == 0, "ollama itself still answers"
        time.sleep(2 * 1.0)  # a failed load is not retried while the same ollama runs
        assert json.loads(supervisor(env, "health", "--loaded", "--json").stdout)["state"] == "failed"
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    text = log.read_text()
    assert "serve: OLLAMA_LOAD_TIMEOUT=2s (serve.env; builder's rule would say 300s)" in text
    assert text.count("serve: loading tiny:latest (") == 1, "loaded once, not retried"
