"""Disk space checked before it is filled (issue 28), on real small file
systems: tmpfs mounts of 64 MiB stand in for a full system disk. Root mounts
them (CI runs as root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_host_target import HostProject, project  # noqa: F401 - the fixture

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@needs_root
def test_a_download_cache_without_room_refuses_before_the_first_byte(project: HostProject, small_disk: Path) -> None:  # noqa: F811
    assert project.builder("sample-model").returncode == 0
    project.env["BUILDER_CACHE_DIR"] = str(small_disk)
    result = project.builder("up")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: not enough disk space: download of llama-b4610-bin-ubuntu-x64.zip"), result.stderr
    assert "0.06 GiB free there" in errors[0]
    assert not [name for name in tree(small_disk) if name.endswith(".part") and (small_disk / name).stat().st_size]
    assert not (project.prefix / "staged").exists()


@needs_root
def test_a_prefix_without_room_for_the_unpacked_releases_refuses_before_staging(project: HostProject, small_disk: Path) -> None:  # noqa: F811
    assert project.builder("sample-model").returncode == 0
    config = project.root / "builder.yaml"
    config.write_text(config.read_text().replace("prefix: ./prefix", f"prefix: {small_disk}/prefix"))
    result = project.builder("up")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: not enough disk space: staged releases"), result.stderr
    assert not (small_disk / "prefix" / "staged").exists()
    assert len(tree(project.root / "cache")) >= 2  # the downloads themselves fitted and are kept for the next try
