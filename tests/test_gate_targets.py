"""serve.auth: keys on the host target, end to end (issue 31): a gate on
serve.bind:serve.port asks every request for a key; ollama listens on
loopback behind it; `builder keys` shows, adds and revokes keys; a revoked
key is refused with the model still loaded. Real clients: curl and httpx."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import httpx
import pytest

from tests.engine.conftest import LLAMA_PATH, OLLAMA_PATH
from tests.fixtures.artifact_server import ArtifactServer
from tests.fixtures.llama_cpp_release import llama_cpp_release_zip
from tests.fixtures.ollama_release import ollama_release_tgz
from tests.test_host_target import HostProject


@pytest.fixture
def gated(tmp_path):
    server = ArtifactServer(files={OLLAMA_PATH: ollama_release_tgz(), LLAMA_PATH: llama_cpp_release_zip().read_bytes()}).start()
    project = HostProject(tmp_path, server)
    config = tmp_path / "builder.yaml"
    config.write_text(config.read_text().replace("  bind: 127.0.0.1\n", "  bind: 0.0.0.0\n", 1))
    assert "bind: 0.0.0.0" in config.read_text()
    assert project.builder("sample-model").returncode == 0
    yield project
    project.builder("down")
    server.stop()


def curl(*args: str) -> tuple[int, str]:
    result = subprocess.run(["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}", "--noproxy", "*", *args],
                            capture_output=True, text=True, timeout=120)
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body


def sdk_clients_answer(url: str, key: str) -> None:
    """The openai SDK with api_key and the ollama client with an Authorization header, as users configure them."""
    import ollama
    import openai

    answer = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert answer.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-not-ours-000000000000", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    client = ollama.Client(host=url, headers={"Authorization": f"Bearer {key}"})
    assert client.generate(model="tiny", prompt="hi", options={"num_predict": 3}).eval_count == 3
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=url).list()
    assert refused.value.status_code == 401


def test_a_bind_beyond_loopback_gets_keys_and_a_gate(gated: HostProject) -> None:
    project = gated
    result = project.builder("up")
    assert result.returncode == 0, result.stderr[-3000:]
    keys_file = project.prefix / "api-keys"
    assert f"keys: made an API key named default in {keys_file} (mode 0600)" in result.stderr
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    key = project.builder("keys", "show", "default").stdout.strip()
    assert len(key) >= 40 and key not in result.stderr and key not in (project.prefix / "run" / "serve.log").read_text()
    url = project.url

    # No key, a wrong key: 401 in ollama's error shape. The key: an answer.
    code, body = curl(f"{url}/api/tags")
    assert code == 401 and "error" in json.loads(body)
    code, _ = curl("-H", "Authorization: Bearer not-a-key-of-ours", f"{url}/api/tags")
    assert code == 401
    code, body = curl("-H", f"Authorization: Bearer {key}", "-d", json.dumps({"model": "tiny", "prompt": "a", "stream": False}),
                      f"{url}/api/generate")
    assert code == 200 and json.loads(body)["done"] is True
    # ollama itself answers only on loopback, behind the gate.
    runtime_env = (project.prefix / "run" / "serve.log").read_text()
    assert f"serve: starting " in runtime_env and f"serve on 127.0.0.1:{project.port + 1}" in runtime_env

    sdk_clients_answer(url, key)

    # A key that is not admin may not change the store.
    code, _ = curl("-X", "DELETE", "-H", f"Authorization: Bearer {key}", "-d", '{"model": "tiny"}', f"{url}/api/delete")
    assert code == 403
    code, body = curl("-H", f"Authorization: Bearer {key}", f"{url}/api/tags")
    assert "tiny:latest" in body

    # A key that is not admin cannot unload the model or reload it with other
    # runner options: those fields are dropped (the gate's log says so).
    starts = (project.prefix / "run" / "serve.log").read_text().count("starting llama server")
    for body in ({"model": "tiny", "keep_alive": 0}, {"model": "tiny", "prompt": "a", "stream": False, "options": {"num_ctx": 1024}}):
        assert curl("-H", f"Authorization: Bearer {key}", "-d", json.dumps(body), f"{url}/api/generate")[0] == 200
    ps = httpx.get(f"{url}/api/ps", headers={"Authorization": f"Bearer {key}"}, trust_env=False).json()
    assert [m["name"] for m in ps["models"]] == ["tiny:latest"]
    serve_log = (project.prefix / "run" / "serve.log").read_text()
    assert serve_log.count("starting llama server") == starts, "not reloaded"
    assert "dropped keep_alive" in serve_log and "dropped options.num_ctx" in serve_log

    # status and up see through the gate with the file's key.
    status = json.loads(project.builder("status", "--json").stdout)
    assert status["model_listed"] is True and status["loaded"]["size"] > 0

    # Another key; revoking the first takes effect at once, the model stays loaded.
    second = project.builder("keys", "add", "alice").stdout.strip()
    assert project.builder("keys", "list").stdout.split() == ["default", "alice"]
    starts = (project.prefix / "run" / "serve.log").read_text().count("starting llama server")
    assert project.builder("keys", "revoke", "default").returncode == 0
    code, _ = curl("-H", f"Authorization: Bearer {key}", f"{url}/api/tags")
    assert code == 401
    ps = httpx.get(f"{url}/api/ps", headers={"Authorization": f"Bearer {second}"}, trust_env=False).json()
    assert [m["name"] for m in ps["models"]] == ["tiny:latest"]
    assert (project.prefix / "run" / "serve.log").read_text().count("starting llama server") == starts, "no reload"


def test_auth_none_beyond_loopback_is_a_config_error(gated: HostProject) -> None:
    config = gated.root / "builder.yaml"
    config.write_text(config.read_text().replace("  bind: 0.0.0.0\n", "  bind: 0.0.0.0\n  auth: none\n", 1))
    result = gated.builder("validate")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"serve.auth: none would let anyone who reaches 0.0.0.0:{gated.port} run prompts and "
                                          "delete the model; use keys (the default), or bind 127.0.0.1"), result.stderr


def test_keys_follow_the_target_given_on_the_command_line(gated: HostProject) -> None:
    """A compose config brought up with --target host: the gate, `up` and
    `builder keys --target host` all use the prefix's keys file."""
    project = gated
    config = project.root / "builder.yaml"
    config.write_text(config.read_text().replace("target: host\n", "", 1))
    result = project.builder("up", "--target", "host")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"made an API key named default in {project.prefix / 'api-keys'}" in result.stderr
    assert not (project.root / "api-keys").exists()
    key = project.builder("keys", "show", "default", "--target", "host").stdout.strip()
    assert curl("-H", f"Authorization: Bearer {key}", f"{project.url}/api/tags")[0] == 200
    assert project.builder("down", "--target", "host").returncode == 0
