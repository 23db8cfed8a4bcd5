"""builder.preflight.readrate and doctor's read-rate lines: a bounded, cold,
sequential read, on a local disk and behind a real throttle (rclone FUSE)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder.preflight.readrate import TEMP_PREFIX, ReadRate, load_seconds, measure
from tests.fixtures import throttle
from tests.helpers import run_builder, tree_snapshot

MIB = 1 << 20


def write_file(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        for _ in range(size // (8 * MIB)):
            handle.write(os.urandom(8 * MIB))
        handle.write(os.urandom(size % (8 * MIB)))
    return path


def test_a_local_file_reads_fast_and_within_the_limit(tmp_path: Path) -> None:
    model = write_file(tmp_path / "model.gguf", 96 * MIB)
    rate = measure(model, seconds=3.0, limit=64 * MIB, what="model volume")
    assert 0 < rate.bytes <= 64 * MIB, rate
    assert rate.mb_s > 50, rate.line()
    assert rate.line().startswith(f"model volume {model}: ") and " MB/s (" in rate.line()
    whole = measure(tmp_path, seconds=3.0)  # a folder: its largest *.gguf
    assert whole.file == model and whole.bytes == 96 * MIB, whole


def test_a_throttled_mount_reads_at_its_limit_every_time(tmp_path: Path) -> None:
    """8 MiB/s behind rclone, twice in a row: the second read is as cold as
    the first (the pages are dropped, never served from the page cache)."""
    assert throttle.missing() is None, throttle.missing()
    source = tmp_path / "share"
    source.mkdir()
    write_file(source / "model.gguf", 64 * MIB)
    expected = 8 * MIB / 1e6  # 8.39 MB/s
    with throttle.throttled(source, tmp_path / "mnt", "8M", tmp_path / "rclone.log") as mount:
        rates = [measure(mount / "model.gguf", seconds=3.0) for _ in range(2)]
        folder = measure(mount, seconds=3.0)  # read-only: its largest *.gguf, no test file
    print("throttled 8M:", [r.line() for r in [*rates, folder]])
    for rate in [*rates, folder]:
        assert abs(rate.mb_s - expected) <= 0.25 * expected, rate.line()
        assert rate.seconds >= 2.5, rate.line()
    assert folder.file == tmp_path / "mnt" / "model.gguf"


def resident(path: Path) -> int:
    """Bytes of `path` in the page cache (util-linux's fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_the_pages_are_dropped_before_the_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local file read a moment ago is in the page cache: measure drops
    its pages first, so the read is the disk's, not memory's."""
    model = write_file(tmp_path / "model.gguf", 64 * MIB)
    with open(model, "rb") as handle:
        os.fsync(handle.fileno())  # clean pages: only those can be dropped, as a model's always are
        while handle.read(8 * MIB):
            pass
    assert resident(model) == 64 * MIB, "the file should be cached after a read"
    seen: list[int] = []
    readv = os.readv

    def watched(fd: int, buffers: list) -> int:
        if not seen:
            seen.append(resident(model))
        return readv(fd, buffers)

    monkeypatch.setattr(os, "readv", watched)
    rate = measure(model, seconds=3.0)
    assert seen == [0], f"{seen[0]} bytes were still cached when the read began"
    assert rate.bytes == 64 * MIB


def test_a_folder_without_a_model_gets_a_temporary_file_that_is_gone_after(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(b"\0" * 4096)
    before = tree_snapshot(tmp_path)
    rate = measure(tmp_path, seconds=3.0, limit=32 * MIB)
    assert rate.file is not None and rate.file.parent == tmp_path and rate.file.name.startswith(TEMP_PREFIX), rate
    assert not rate.file.exists()
    assert 0 < rate.bytes <= 32 * MIB, rate
    assert tree_snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "sub"]


def test_errors_are_oserrors_and_load_seconds_follows_the_rate(tmp_path: Path) -> None:
    try:
        measure(tmp_path / "missing")
    except FileNotFoundError as exc:
        assert str(tmp_path / "missing") in str(exc)
    else:
        raise AssertionError("a missing path was measured")
    rate = ReadRate(tmp_path, 110_000_000, 1.0)
    assert round(load_seconds(158_000_000_000, rate)) == 1436  # 158 GB at 110 MB/s: 24 min
    assert load_seconds(1, ReadRate(tmp_path, 0, 3.0)) == float("inf")


def test_doctor_shows_the_model_volume_read_rate(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    config = tmp_path / "builder.yaml"
    config.write_text(config.read_text() + "target: host\nhost:\n  prefix: ./prefix\n")
    assert run_builder("sample-model", "-c", str(config), cwd=tmp_path).returncode == 0
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    before = tree_snapshot(tmp_path / "models")
    result = run_builder("doctor", "-c", str(config), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [l for l in result.stdout.splitlines() if "read-rate:" in l]
    assert len(lines) == 1, result.stdout
    volume = tmp_path / "models" / "tiny"
    assert lines[0].startswith(f"ok    read-rate: model volume {volume}: "), lines[0]
    assert " MB/s (" in lines[0] and lines[0].endswith(" model reads in 0 s"), lines[0]
    assert tree_snapshot(tmp_path / "models") == before, "doctor left or changed a file in the storage"
    checks = json.loads(run_builder("doctor", "-c", str(config), "--json", cwd=tmp_path, env=env).stdout)
    assert [c["status"] for c in checks if c["name"] == "read-rate"] == ["ok"]


def test_doctor_warns_about_a_slow_model_volume_without_a_model_cache(tmp_path: Path) -> None:
    """The shards behind 8 MiB/s: a full read takes over 5 minutes, so doctor
    warns with the fix; with a model cache set, the volume's line is fine
    and the cache gets a line of its own."""
    import dataclasses
    from types import SimpleNamespace

    from builder.config import load_config
    from builder.targets.doctor import check_read_rates

    assert throttle.missing() is None, throttle.missing()
    source = tmp_path / "share"
    (source / "tiny").mkdir(parents=True)
    for n in (1, 2, 3):
        with open(source / "tiny" / f"tiny-0000{n}-of-00003.gguf", "wb") as handle:
            handle.truncate(2 << 30)  # sparse: 6 GiB that take 13 min to read at 8 MiB/s
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    config_path = tmp_path / "builder.yaml"
    mount = tmp_path / "mnt"
    text = config_path.read_text().replace("local: ./models", f"local: {mount}")
    config_path.write_text(text + "target: host\nhost:\n  prefix: ./prefix\n")
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    with throttle.throttled(source, mount, "8M", tmp_path / "rclone.log"):
        result = run_builder("doctor", "-c", str(config_path), cwd=tmp_path, env=env)
        lines = [l for l in result.stdout.splitlines() if "read-rate:" in l]
        assert len(lines) == 1, result.stdout + result.stderr
        assert lines[0].startswith(f"warn  read-rate: model volume {mount}/tiny: "), lines[0]
        assert "; a 6.4 GB model reads in " in lines[0] and lines[0].endswith(
            " min, at every load -> set storage.model_cache to a folder on this machine's local disk (README: Model cache)"), lines[0]

        config = load_config(str(config_path))
        cache = tmp_path / "cache"
        cache.mkdir()
        storage = SimpleNamespace(**{**vars(config.storage), "model_cache": str(cache)})
        volume, cached = check_read_rates(dataclasses.replace(config, storage=storage))
    print(lines[0], volume.line(), cached.line(), sep="\n")
    assert volume.status == "ok" and volume.detail.startswith(f"model volume {mount}/tiny: "), volume
    assert cached.status == "ok" and cached.detail.startswith(f"model cache {cache}: "), cached
    assert "; a 6.4 GB model reads in " in cached.detail, cached
    assert list(cache.iterdir()) == []


def test_up_reuses_a_fresh_remembered_rate_and_measures_a_stale_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each measurement reads the share: `up` takes a rate remembered within
    a day instead (here a slow one, which only the remembered figure can
    give on this local disk), and measures again once it is older."""
    import time

    from builder.config import load_config
    from builder.preflight.where import FRESH_S, RATES_FILE, slow_volume_warning

    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    assert run_builder("sample-model", cwd=tmp_path).returncode == 0
    write_file(tmp_path / "models" / "tiny" / "big.gguf", 32 << 20)
    monkeypatch.setenv("BUILDER_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config(tmp_path / "builder.yaml")
    rates = tmp_path / "cache" / RATES_FILE
    rates.parent.mkdir()
    volume = str((tmp_path / "models" / "tiny").resolve())

    rates.write_text(json.dumps({volume: {"mb_s": 5.0, "at": int(time.time()) - 60}}))
    warning, new = slow_volume_warning(config, 10 * 10**9)
    assert new is None, "a fresh remembered rate is not measured again"
    assert warning is not None and "at 5 MB/s: 33 min" in warning, warning

    rates.write_text(json.dumps({volume: {"mb_s": 5.0, "at": int(time.time()) - FRESH_S - 60}}))
    warning, new = slow_volume_warning(config, 10 * 10**9)
    assert new is not None and new.mb_s > 50, "a stale one is measured: local disk"
    assert warning is None
