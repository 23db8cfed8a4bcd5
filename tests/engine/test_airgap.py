"""Air-gapped delivery: export -> remove -> import keeps the image ID; push to a registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.engine.conftest import TinyStack, docker
from tests.helpers import run_builder

pytestmark = pytest.mark.engine


def test_export_remove_import_keeps_the_id(tiny_stack: TinyStack, tmp_path: Path) -> None:
    built = json.loads(tiny_stack.builder("build", "--json").stdout)
    archive = tmp_path / "carry" / "image.tar.gz"
    result = tiny_stack.builder("export", "-o", str(archive))
    assert result.returncode == 0, result.stderr
    sidecar = archive.with_name("image.tar.gz.sha256")
    digest = sidecar.read_text().split()[0]
    assert result.stdout.strip() == f"{archive} sha256:{digest}"
    docker("image", "rm", "-f", tiny_stack.image)
    assert docker("image", "inspect", tiny_stack.image, check=False).returncode != 0
    imported = run_builder("import", str(archive), cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == f"{tiny_stack.image} {built['id']}"
    assert "sha256 matches" in imported.stderr
    # A damaged copy is refused before anything is loaded.
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    bad = run_builder("import", str(archive), cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.strip().endswith("says " + digest + "; copy it again")


def test_push_to_a_registry(tiny_stack: TinyStack, registry: str) -> None:
    assert tiny_stack.builder("build").returncode == 0
    result = tiny_stack.builder("push", f"{registry}/team/tiny:v1")
    assert result.returncode == 0, result.stderr
    pushed = result.stdout.strip()
    assert pushed.startswith(f"{registry}/team/tiny:v1@sha256:")
    # Without a registry host, the target goes to mirrors.registry.
    tiny_stack.config.write_text(tiny_stack.config.read_text() + f"mirrors:\n  registry: {registry}\n")
    again = tiny_stack.builder("push", "team/tiny:v2")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"{registry}/team/tiny:v2@sha256:")
    docker("image", "rm", f"{registry}/team/tiny:v1", f"{registry}/team/tiny:v2", check=False)
    docker("pull", pushed.replace(":v1@", "@"))
    docker("image", "rm", pushed.replace(":v1@", "@"), check=False)
