"""Fixtures for tests on the real engine.

Everything is real but ollama: release archives served from 127.0.0.1 (a
llama.cpp zip holding llama-gguf-split compiled from source, an ollama tgz
holding the ollama double), a base image bootstrapped from the Debian mirror
by builder itself, shards written by gguf-py, Compose v2 running the stack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from builder.cli import PRESETS_DIR
from tests.fixtures.artifact_server import ArtifactServer
from tests.fixtures.llama_cpp_release import llama_cpp_release_zip
from builder.sample import write_split_model
from tests.fixtures.ollama_release import ollama_release_tgz
from tests.helpers import free_port, run_builder

OLLAMA_PATH = "/ollama/ollama/releases/download/v0.5.7/ollama-linux-amd64.tgz"
LLAMA_PATH = "/ggml-org/llama.cpp/releases/download/b4610/llama-b4610-bin-ubuntu-x64.zip"
NASTY_VALUE = 'a$b ${HOME} "q" `x` {{ y }} \\z'




def docker(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr}")
    return result


@pytest.fixture(scope="session")
def release_server(docker_engine):
    server = ArtifactServer(files={OLLAMA_PATH: ollama_release_tgz(), LLAMA_PATH: llama_cpp_release_zip().read_bytes()}).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


class TinyStack:
    """A tiny-preset project in a temporary folder, with its own name, port and image tag."""

    def __init__(self, root: Path, server: ArtifactServer, cache: Path, gpus: str = "none"):
        self.root = root
        self.project = f"bt-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        text = (PRESETS_DIR / "tiny.yaml").read_text(encoding="utf-8").replace("gpus: none", f"gpus: {gpus}")
        # serve is the preset's last block: give ollama a value that every
        # layer (YAML, Compose interpolation, the shell) would like to mangle.
        text += "  env:\n    BUILDER_TEST_NASTY: " + json.dumps(NASTY_VALUE) + "\n"
        text += (
            f"ollama:\n  url: {server.url}/ollama/ollama/releases/download/v{{version}}/ollama-linux-amd64.tgz\n"
            f"llama_cpp:\n  url: {server.url}/ggml-org/llama.cpp/releases/download/{{build}}/llama-{{build}}-bin-ubuntu-x64.zip\n"
        )
        self.config = root / "builder.yaml"
        self.config.write_text(text, encoding="utf-8")
        self.models = root / "models" / "tiny"
        self.env = {
            "BUILDER_PROJECT": self.project,
            "BUILDER_SERVE_PORT": str(self.port),
            "BUILDER_IMAGE_TAG": self.project,
            "BUILDER_CACHE_DIR": str(cache),
            "NO_PROXY": "127.0.0.1",
        }
        self.context = root / "context"

    def write_model(self, **kwargs) -> list[Path]:
        shards = write_split_model(self.models, "tiny", 3, **kwargs)
        self.own()
        return shards

    def own(self, uid: int = 1000, gid: int = 1000) -> None:
        """The containers run as 1000:1000 (image.uid, image.gid): give them the storage."""
        for path in [self.root / "models", *(self.root / "models").rglob("*")]:
            os.chown(path, uid, gid)

    def builder(self, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return run_builder(*args, "-c", str(self.config), cwd=self.root, env=self.env, timeout=timeout)

    @property
    def image(self) -> str:
        return f"builder-tiny:{self.project}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
        return docker("compose", "-f", str(self.context / "compose.yaml"), *args, check=check, timeout=timeout)

    def container(self, service: str) -> str | None:
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        return ids[0] if ids else None

    def inspect(self, service: str) -> dict:
        container = self.container(service)
        assert container, f"no {service} container"
        return json.loads(docker("inspect", container).stdout)[0]

    def wait_for(self, predicate, seconds: float = 60, what: str = "condition") -> None:
        deadline = time.time() + seconds
        while not predicate():
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", check=False)
        docker("rm", "-f", self.project, check=False)  # the single-container target
        docker("image", "rm", "-f", self.image, check=False)


@pytest.fixture
def tiny_stack(release_server, shared_cache, tmp_path):
    stack = TinyStack(tmp_path, release_server, shared_cache)
    yield stack
    stack.down()


@pytest.fixture
def gpu_stack(release_server, shared_cache, tmp_path):
    stack = TinyStack(tmp_path, release_server, shared_cache, gpus="all")
    yield stack
    stack.down()


@pytest.fixture
def registry(tmp_path: Path, docker_engine):
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry is not installed: `apt-get install docker-registry` (.ci/run does)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: error\n"
    )
    process = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2)
            break
        except OSError:
            assert time.time() < deadline, "the registry did not start"
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait()
