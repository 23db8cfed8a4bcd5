"""serve.auth: keys in containers (issue 31): compose reads the keys as a
compose secret, single through a read-only bind mount; the published port
is the gate's, ollama listens on the container's loopback. A revoked key is
refused from the next request on, the model still loaded."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.engine.conftest import TinyStack, docker
from tests.test_gate_targets import sdk_clients_answer

pytestmark = pytest.mark.engine


def curl(*args: str) -> tuple[int, str]:
    result = subprocess.run(["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}", "--noproxy", "*", *args],
                            capture_output=True, text=True, timeout=120)
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body


@pytest.mark.parametrize("target", ["compose", "single"])
def test_keys_guard_the_published_port(tiny_stack: TinyStack, target: str) -> None:
    tiny_stack.config.write_text(tiny_stack.config.read_text().replace("  bind: 127.0.0.1\n", "  bind: 0.0.0.0\n", 1))
    tiny_stack.write_model()
    result = tiny_stack.builder("up", "--target", target)
    assert result.returncode == 0, result.stderr[-3000:]
    keys_file = tiny_stack.root / "api-keys"
    assert f"keys: made an API key named default in {keys_file}" in result.stderr
    key = tiny_stack.builder("keys", "show", "default").stdout.strip()
    url = tiny_stack.url
    code, body = curl(f"{url}/api/tags")
    assert code == 401 and "error" in json.loads(body)
    code, body = curl("-H", f"Authorization: Bearer {key}", "-d",
                      json.dumps({"model": "tiny", "prompt": "Why?", "stream": False, "options": {"num_predict": 4}}), f"{url}/api/generate")
    assert code == 200 and json.loads(body)["eval_count"] == 4
    sdk_clients_answer(url, key)
    code, _ = curl("-X", "DELETE", "-H", f"Authorization: Bearer {key}", "-d", '{"model": "tiny"}', f"{url}/api/delete")
    assert code == 403
    serve = tiny_stack.container("serve") if target == "compose" else tiny_stack.project
    logs = docker("logs", serve).stdout + docker("logs", serve).stderr
    assert key not in logs and "Why?" not in logs, "no key and no prompt in the log"
    assert "serve on 127.0.0.1:11435" in logs, "ollama on the container's loopback, behind the gate"
    starts = logs.count("starting llama server")
    second = tiny_stack.builder("keys", "add", "second").stdout.strip()
    assert tiny_stack.builder("keys", "revoke", "default").returncode == 0
    assert curl("-H", f"Authorization: Bearer {key}", f"{url}/api/tags")[0] == 401
    code, body = curl("-H", f"Authorization: Bearer {second}", f"{url}/api/ps")
    assert code == 200 and [m["name"] for m in json.loads(body)["models"]] == ["tiny:latest"]
    logs = docker("logs", serve).stdout + docker("logs", serve).stderr
    assert logs.count("starting llama server") == starts, "the model was not reloaded"
    status = json.loads(tiny_stack.builder("status", "--json", "--target", target).stdout)
    assert status["model_listed"] is True
