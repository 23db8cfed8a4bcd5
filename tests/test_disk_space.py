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


@needs_root
def test_an_engine_data_root_without_room_refuses_before_staging(project: HostProject, small_disk: Path) -> None:  # noqa: F811
    """The build's third place: the engine's data root (here a small file system standing in for it)."""
    from builder.config import load_config
    from builder.image.build import fetch_and_stage
    from builder.image.fetch import FetchSettings
    from builder.preflight.disk import NoSpace

    config_path = str(project.root / "builder.yaml")
    config = load_config(config_path)
    context = project.root / "context"
    with pytest.raises(NoSpace, match=r"^not enough disk space: image build \d+\.\d\d GiB \(" + str(small_disk)):
        fetch_and_stage(config_path, config, context, FetchSettings(project.root / "cache"), str(small_disk), True, print)
    assert not (context / "staged").exists()


@needs_root
def test_an_export_without_room_writes_nothing(small_disk: Path) -> None:
    """`export` checks its folder against the image's size before it writes."""
    from builder.image.airgap import export_image
    from builder.preflight.disk import NoSpace

    class Engine:  # the adapter's two answers export asks for before it writes
        def image_id(self, ref: str) -> str:
            return "sha256:" + "0" * 64

        def image_size(self, ref: str) -> int:
            return 100 << 20

        def save(self, ref: str):
            raise AssertionError("nothing may be read from the engine when there is no room")

    with pytest.raises(NoSpace, match=r"^not enough disk space: export archive 0\.10 GiB"):
        export_image(Engine(), "builder-tiny:v1", small_disk / "out" / "image.tar.gz", print)
    assert tree(small_disk) == []
