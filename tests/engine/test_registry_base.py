"""A base pinned by digest, pulled through a registry mirror: a real registry
(Debian's docker-registry) on 127.0.0.1 stands in for the mirror."""

from __future__ import annotations

import json

import pytest

from tests.engine.conftest import TinyStack, docker, free_port

pytestmark = pytest.mark.engine


def test_pinned_base_is_pulled_through_the_mirror(tiny_stack: TinyStack, registry: str) -> None:
    # The bootstrap base, published as "debian" under the mirror's docker.io path.
    assert tiny_stack.builder("base").returncode == 0
    base = tiny_stack.builder("base").stdout.split()[0]
    mirrored = f"{registry}/mirror/docker.io/library/debian"
    docker("tag", base, f"{mirrored}:bookworm")
    docker("push", f"{mirrored}:bookworm")
    repo_digest = next(d for d in json.loads(docker("image", "inspect", f"{mirrored}:bookworm").stdout)[0]["RepoDigests"] if d.startswith(mirrored))
    digest = repo_digest.split("@", 1)[1]
    docker("image", "rm", f"{mirrored}:bookworm", repo_digest, check=False)
    assert docker("image", "inspect", repo_digest, check=False).returncode != 0

    text = tiny_stack.config.read_text().replace(
        "image:\n  name: builder-tiny\n", f"image:\n  name: builder-tiny\n  base:\n    ref: debian@{digest}\n"
    )
    text += f"mirrors:\n  registry: {registry}/mirror\n"
    tiny_stack.config.write_text(text)
    result = tiny_stack.builder("build", "--json")
    assert result.returncode == 0, result.stderr
    assert f"pulling {mirrored}@{digest}" in result.stderr
    assert "Pull complete" in result.stderr or "Already exists" in result.stderr or "Digest:" in result.stderr
    dockerfile = (tiny_stack.context / "Dockerfile").read_text()
    assert f"FROM {mirrored}@{digest}\n" in dockerfile
    assert docker("image", "inspect", repo_digest).returncode == 0
    docker("image", "rm", repo_digest, check=False)


def test_unreachable_registry_is_one_clear_line(tiny_stack: TinyStack) -> None:
    port = free_port()
    text = tiny_stack.config.read_text().replace(
        "image:\n  name: builder-tiny\n", "image:\n  name: builder-tiny\n  base:\n    ref: debian@sha256:" + "0" * 64 + "\n"
    )
    text += f"mirrors:\n  registry: 127.0.0.1:{port}\n"
    tiny_stack.config.write_text(text)
    result = tiny_stack.builder("build")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot pull 127.0.0.1:{port}/docker.io/library/debian@sha256:")
    assert last.endswith("check mirrors.registry or load the image by hand")
