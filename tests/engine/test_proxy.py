"""Proxies a Docker client config injects into containers (issue 29): a user
who set `proxies` in ~/.docker/config.json to pull through a corporate or
AutoDL proxy gets HTTP_PROXY in merge, create and serve. The supervisor's
calls to its ollama on loopback must not go through it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.engine.conftest import TinyStack, docker
from tests.engine.test_stack import _get

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("target", ["compose", "single"])
def test_proxies_from_the_docker_client_config_never_reach_loopback(tiny_stack: TinyStack, tmp_path: Path, target: str) -> None:
    assert tiny_stack.builder("build").returncode == 0  # built before the proxies: only the containers get them
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refusing = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there, here or in a container
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir()
    plugins = Path.home() / ".docker" / "cli-plugins"
    if plugins.is_dir():
        (config_dir / "cli-plugins").symlink_to(plugins)
    proxies = {"httpProxy": refusing, "httpsProxy": refusing, "noProxy": ""}
    (config_dir / "config.json").write_text(json.dumps({"proxies": {"default": proxies}}))
    tiny_stack.env["DOCKER_CONFIG"] = str(config_dir)
    tiny_stack.write_model()
    result = tiny_stack.builder("up", "--target", target)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "load: tiny:latest loaded in " in result.stderr
    serve = tiny_stack.container("serve") if target == "compose" else tiny_stack.project
    env = json.loads(docker("inspect", serve).stdout)[0]["Config"]["Env"]
    assert f"HTTP_PROXY={refusing}" in env or f"http_proxy={refusing}" in env, env  # the client config reached the container
    answer = _get(f"{tiny_stack.url}/api/generate", {"model": "tiny", "prompt": "Why?", "stream": False, "options": {"num_predict": 4}})
    assert answer["eval_count"] == 4
