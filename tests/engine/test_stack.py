"""The rendered stack on the real engine and Compose v2."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from builder.cli import preset_names
from tests.engine.conftest import NASTY_VALUE, docker
from tests.helpers import run_builder

pytestmark = pytest.mark.engine


def _time(value: str) -> datetime:
    # Docker prints nanoseconds; datetime takes microseconds.
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}")


@pytest.mark.parametrize("preset", preset_names())
def test_compose_accepts_every_preset(preset: str, tmp_path: Path, docker_engine) -> None:
    assert run_builder("init", "--preset", preset, cwd=tmp_path).returncode == 0
    result = run_builder("render", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = docker("compose", "-f", str(tmp_path / "context" / "compose.yaml"), "config").stdout
    resolved = yaml.safe_load(config)
    serve = resolved["services"]["serve"]
    assert resolved["services"]["create"]["depends_on"]["merge"]["condition"] == "service_completed_successfully"
    assert serve["depends_on"]["create"]["condition"] == "service_completed_successfully"
    if preset.startswith("deepseek"):
        opts = resolved["volumes"]["models"]["driver_opts"]
        assert opts["type"] == "nfs" and opts["o"].startswith("addr=192.0.2.10,") and opts["device"] == ":/export/models"
        devices = serve["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    else:
        assert "deploy" not in serve


def test_merge_then_create_then_serve(tiny_stack) -> None:
    tiny_stack.render_and_build()
    result = tiny_stack.compose("up", "-d", "--wait", "--wait-timeout", "120", check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    merge, create, serve = (tiny_stack.inspect(s) for s in ("merge", "create", "serve"))
    for one_shot in (merge, create):
        assert one_shot["State"]["Status"] == "exited" and one_shot["State"]["ExitCode"] == 0
    assert serve["State"]["Running"] and serve["State"]["Health"]["Status"] == "healthy"
    assert f"BUILDER_TEST_NASTY={NASTY_VALUE}" in serve["Config"]["Env"]
    assert _time(merge["State"]["FinishedAt"]) <= _time(create["State"]["StartedAt"])
    assert _time(create["State"]["FinishedAt"]) <= _time(serve["State"]["StartedAt"])
    logs = tiny_stack.compose("logs", "--no-color", "merge", "create").stdout
    assert "supervisor: merge:" in logs and "supervisor: create:" in logs
    # The API is published on the loopback address only, at the configured port.
    ports = serve["NetworkSettings"]["Ports"]["11434/tcp"]
    assert ports == [{"HostIp": "127.0.0.1", "HostPort": str(tiny_stack.port)}]
    import urllib.request

    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{tiny_stack.port}/", timeout=5) as response:
                assert response.read() == b"Ollama is running"
                break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def test_image_carries_labels_and_env(tiny_stack) -> None:
    tiny_stack.render_and_build()
    info = docker("image", "inspect", tiny_stack.image).stdout
    import json

    config = json.loads(info)[0]["Config"]
    labels = config["Labels"]
    assert labels["io.builder.ollama.version"] == "0.5.7"
    assert labels["io.builder.llama-cpp.build"] == "b4610"
    assert len(labels["io.builder.config.sha256"]) == 64
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["LD_LIBRARY_PATH"] == "/opt/llama.cpp/build/bin"
    assert env["OLLAMA_MODELS"] == "/models/ollama"
    assert config["Entrypoint"] == ["python3", "-m", "supervisor"]
    # The placeholder llama-gguf-split is on PATH; the double answers --version.
    out = docker("run", "--rm", "--entrypoint", "llama-gguf-split", tiny_stack.image, "--help").stdout
    assert "placeholder" in out
    out = docker("run", "--rm", "--entrypoint", "ollama", tiny_stack.image, "--version").stdout
    assert "0.5.7" in out


def test_gpu_request_reaches_the_engine(gpu_stack) -> None:
    gpu_stack.render_and_build()
    result = gpu_stack.compose("up", "-d", check=False, timeout=300)
    assert result.returncode != 0
    assert 'could not select device driver "nvidia" with capabilities: [[gpu]]' in result.stderr
    # merge and create, which ask for no GPU, still ran to completion first.
    assert gpu_stack.inspect("create")["State"]["ExitCode"] == 0
