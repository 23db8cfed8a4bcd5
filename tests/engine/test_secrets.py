"""No secret (proxy password, registry credentials) lands in a rendered file
or an image layer: build with both in the environment, then scan."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.engine.conftest import TinyStack

pytestmark = pytest.mark.engine

PROXY_SECRET = "s3cr3t-proxy-pw"
REGISTRY_SECRET = "s3cr3t-registry-pw"


def test_build_leaks_no_secret(tiny_stack: TinyStack, tmp_path: Path) -> None:
    docker_config = tmp_path / "docker-config"
    docker_config.mkdir()
    plugins = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "cli-plugins"
    if plugins.is_dir():
        (docker_config / "cli-plugins").symlink_to(plugins)
    auth = base64.b64encode(f"builder:{REGISTRY_SECRET}".encode()).decode()
    (docker_config / "config.json").write_text(json.dumps({"auths": {"registry.example.cn": {"auth": auth}}}))
    tiny_stack.env.update(
        DOCKER_CONFIG=str(docker_config),
        HTTPS_PROXY=f"http://builder:{PROXY_SECRET}@127.0.0.1:9",
        HTTP_PROXY=f"http://builder:{PROXY_SECRET}@127.0.0.1:9",
    )
    result = tiny_stack.builder("build", "--no-cache")
    assert result.returncode == 0, result.stderr
    secrets = (PROXY_SECRET.encode(), REGISTRY_SECRET.encode(), auth.encode())
    for path in [*tiny_stack.context.rglob("*"), tiny_stack.root / "builder.lock"]:
        if path.is_file():
            data = path.read_bytes()
            assert not any(s in data for s in secrets), f"a secret landed in {path}"
    saved = subprocess.run(["docker", "save", tiny_stack.image], capture_output=True, check=True).stdout
    assert len(saved) > 1 << 20
    assert not any(s in saved for s in secrets), "a secret landed in the image"
    history = subprocess.run(["docker", "history", "--no-trunc", tiny_stack.image], capture_output=True, text=True).stdout
    assert PROXY_SECRET not in history and REGISTRY_SECRET not in history
