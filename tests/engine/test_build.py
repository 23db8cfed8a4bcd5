"""`builder build` on the real engine: a working image, built twice the same."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.engine.conftest import TinyStack, docker

pytestmark = pytest.mark.engine


def test_image_runs_the_real_tools(tiny_stack: TinyStack) -> None:
    result = tiny_stack.builder("build", "--json")
    assert result.returncode == 0, result.stderr
    built = json.loads(result.stdout)
    assert built["image"] == tiny_stack.image and built["reproducible"] is True
    assert built["id"] == docker("image", "inspect", "--format", "{{.Id}}", tiny_stack.image).stdout.strip()
    # The real llama-gguf-split, with the libraries staged beside it.
    usage = docker("run", "--rm", "--entrypoint", "llama-gguf-split", tiny_stack.image, "--help", check=False)
    assert "--merge" in usage.stdout + usage.stderr
    listing = docker("run", "--rm", "--entrypoint", "ls", tiny_stack.image, "/opt/llama.cpp/build/bin").stdout.split()
    assert listing == ["libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so", "llama-gguf-split"]
    version = docker("run", "--rm", "--entrypoint", "ollama", tiny_stack.image, "--version").stdout
    assert "0.5.7" in version
    config = json.loads(docker("image", "inspect", tiny_stack.image).stdout)[0]["Config"]
    labels = config["Labels"]
    lock = json.loads((tiny_stack.root / "builder.lock").read_text())
    assert set(lock["artifacts"]) == {"llama_cpp", "ollama"}
    assert len(labels["io.builder.lock.sha256"]) == 64 and labels["io.builder.ollama.version"] == "0.5.7"
    assert config["Entrypoint"] == ["python3", "-m", "supervisor"]
    # Nothing but the download cache and the image stays: no staged copy in the
    # context, no BuildKit copy of the context (issue 28).
    assert not (built_context := Path(built["context"]) / "staged").exists(), built_context
    copies = subprocess.run(["docker", "buildx", "du", "--verbose"], capture_output=True, text=True).stdout
    assert "local source for context" not in copies


def test_clean_builds_give_the_same_image_id(tiny_stack: TinyStack, tmp_path_factory) -> None:
    ids = []
    for _ in range(2):
        shutil.rmtree(tiny_stack.context, ignore_errors=True)
        result = tiny_stack.builder("build", "--no-cache", "--json")
        assert result.returncode == 0, result.stderr
        ids.append(json.loads(result.stdout)["id"])
    assert ids[0] == ids[1]
    # Elsewhere (another folder, another cache, the same config and lock): the same ID again.
    other_root = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(tiny_stack.config, other_root / "builder.yaml")
    shutil.copy(tiny_stack.root / "builder.lock", other_root / "builder.lock")
    (other_root / "models").mkdir()
    other = TinyStack.__new__(TinyStack)
    other.__dict__.update(tiny_stack.__dict__)
    other.root, other.config, other.context = other_root, other_root / "builder.yaml", other_root / "context"
    other.env = dict(tiny_stack.env, BUILDER_CACHE_DIR=str(other_root / "cache"))
    result = other.builder("build", "--no-cache", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == ids[0]


def test_offline_build_with_an_empty_cache_fails_cleanly(tiny_stack: TinyStack, tmp_path) -> None:
    tiny_stack.env["BUILDER_CACHE_DIR"] = str(tmp_path / "empty-cache")
    result = tiny_stack.builder("build", "--offline")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: offline: llama-b4610-bin-ubuntu-x64.zip is not in the cache")
    assert docker("image", "inspect", tiny_stack.image, check=False).returncode != 0
