"""Fixtures for tests on the real engine: a base image bootstrapped from the
Debian mirror by builder itself, and a product image built from a rendered
context whose release trees are stand-ins (the ollama double and a
placeholder llama-gguf-split) until the artifacts issue stages real ones."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from builder.cli import PRESETS_DIR
from tests.helpers import run_builder

NASTY_VALUE = 'a$b ${HOME} "q" `x` {{ y }} \\z'
DOUBLE = Path(__file__).resolve().parent.parent / "doubles" / "ollama_double.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def docker(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr}")
    return result


class TinyStack:
    """A tiny-preset project in a temporary folder, with its own name and port."""

    def __init__(self, root: Path, gpus: str = "none"):
        self.root = root
        self.project = f"bt-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.image_tag = self.project
        text = (PRESETS_DIR / "tiny.yaml").read_text(encoding="utf-8").replace("gpus: none", f"gpus: {gpus}")
        # serve is the preset's last block: give ollama a value that every
        # layer (YAML, Compose interpolation, the shell) would like to mangle.
        text += "  env:\n    BUILDER_TEST_NASTY: " + json.dumps(NASTY_VALUE) + "\n"
        self.config = root / "builder.yaml"
        self.config.write_text(text, encoding="utf-8")
        (root / "models" / "tiny").mkdir(parents=True)
        self.env = {
            "BUILDER_PROJECT": self.project,
            "BUILDER_SERVE_PORT": str(self.port),
            "BUILDER_IMAGE_TAG": self.image_tag,
        }
        self.context = root / "context"

    def builder(self, *args: str) -> subprocess.CompletedProcess:
        return run_builder(*args, "-c", str(self.config), cwd=self.root, env=self.env)

    @property
    def image(self) -> str:
        return f"builder-tiny:{self.image_tag}"

    def compose(self, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
        return docker("compose", "-f", str(self.context / "compose.yaml"), *args, check=check, timeout=timeout)

    def render_and_build(self) -> None:
        result = self.builder("render")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(self.context)
        stage_stand_ins(self.context)
        docker("buildx", "build", "--provenance=false", "-t", self.image, str(self.context))

    def inspect(self, service: str) -> dict:
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return json.loads(docker("inspect", ids[0]).stdout)[0]

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", check=False)
        docker("image", "rm", "-f", self.image, check=False)


def stage_stand_ins(context: Path) -> None:
    """Put the ollama double and a placeholder llama-gguf-split where staging will."""
    ollama = context / "staged" / "ollama"
    (ollama / "bin").mkdir(parents=True, exist_ok=True)
    (ollama / "lib" / "ollama").mkdir(parents=True, exist_ok=True)
    (ollama / "lib" / "ollama" / "README.double").write_text("ollama's libraries would be here\n")
    shutil.copy(DOUBLE, ollama / "bin" / "ollama")
    (ollama / "bin" / "ollama").chmod(0o755)
    bin_dir = context / "staged" / "llama.cpp" / "llama.cpp" / "build" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    split = bin_dir / "llama-gguf-split"
    split.write_text('#!/bin/sh\necho "llama-gguf-split placeholder: $*"\n')
    split.chmod(0o755)


@pytest.fixture(scope="session")
def base_image(docker_engine, tmp_path_factory) -> str:
    """The tiny preset's bootstrap base, built by `builder base` (cached by the engine)."""
    root = tmp_path_factory.mktemp("base")
    config = root / "builder.yaml"
    shutil.copy(PRESETS_DIR / "tiny.yaml", config)
    result = run_builder("base", "-c", str(config), cwd=root, timeout=900)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[0]


@pytest.fixture
def tiny_stack(base_image, tmp_path):
    stack = TinyStack(tmp_path)
    yield stack
    stack.down()


@pytest.fixture
def gpu_stack(base_image, tmp_path):
    stack = TinyStack(tmp_path, gpus="all")
    yield stack
    stack.down()
