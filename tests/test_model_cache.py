"""storage.model_cache: the merged model and ollama's store on the serving
machine's own disk, the model storage only read.

The storage here is a real read-only FUSE mount (rclone, tests/fixtures/
throttle.py) of a folder holding the shards, so any write to it fails and
every byte read from it is counted (rclone's own read counter): the "share".
The host target needs no engine; the ollama double's runner is real
llama.cpp. Compose, single and Kubernetes render the same layout (checked
here from their rendered files; tests/engine/test_stack.py runs compose).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from builder.sample import write_split_model
from tests.fixtures.throttle import missing, prime, rclone_reads, throttled
from tests.helpers import run_builder
from tests.test_host_target import PROMPT, HostProject, post
from tests.test_host_target import project as project  # noqa: F401 - the fixture
from tests.test_sample_model import greedy
from tests.fixtures.llama_cpp_release import llama_cpp_bin_dir

MIB = 1 << 20


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def share(project: HostProject, tmp_path: Path):
    """The shards (about 40 MiB of random weights) behind a read-only rclone mount at the project's storage."""
    assert missing() is None, missing()
    source = tmp_path / "share-source"
    write_split_model(source / "tiny", "tiny", 3, blocks=4, width=512)
    (project.root / "models").mkdir(exist_ok=True)
    with throttled(source, project.root / "models", "400M", tmp_path / "rclone.log", exact=True) as mount:
        prime(mount)
        yield source
        project.builder("down")


def with_cache(project: HostProject, cache: str = "./model-cache") -> Path:
    config = project.root / "builder.yaml"
    data = yaml.safe_load(config.read_text())
    data["storage"]["model_cache"] = cache
    config.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return (project.root / cache).resolve()


def test_a_restart_reads_nothing_from_the_share(project: HostProject, share: Path) -> None:
    cache = with_cache(project)
    before = tree(share)
    shards = sum(size for size, _ in before.values())
    mount = project.root / "models"

    read = rclone_reads(mount)
    first = project.builder("up")
    assert first.returncode == 0, first.stderr[-3000:]
    first_read = rclone_reads(mount) - read
    merged = cache / "tiny" / "tiny.gguf"
    assert merged.is_file() and f"merge: joining 3 shards ({shards / MIB:.1f} MiB) into {merged}" in first.stderr, first.stderr
    blob = max((cache / "ollama" / "blobs").glob("sha256-*"), key=lambda p: p.stat().st_size)
    assert os.path.samefile(blob, merged), "0.5.7's create links the merged file in the cache: no second copy"
    assert shards <= first_read < 1.1 * shards, f"the first deploy read {first_read} bytes from the share, the shards are {shards}"
    assert tree(share) == before, "nothing on the share was written"
    expected, _ = greedy(llama_cpp_bin_dir(), merged, PROMPT, 8)
    answer = post(f"{project.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
    assert answer["response"] == expected

    assert project.builder("down").returncode == 0
    read = rclone_reads(mount)
    again = project.builder("up")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"merge: {merged} is up to date with its 3 shards; nothing to do" in again.stderr
    assert "load: tiny:latest loaded in " in again.stderr
    again_read = rclone_reads(mount) - read
    # rclone's count holds its FUSE requests (a few hundred bytes for the
    # stats); the three shards' headers alone are about 80 KiB.
    assert again_read < 4096, f"a restart read {again_read} bytes from the share: no file should be read, only stat()ed"
    assert post(f"{project.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False,
                                                 "options": {"num_predict": 8}})["response"] == expected


def test_without_a_cache_a_read_only_share_is_refused_before_anything_runs(project: HostProject, share: Path) -> None:
    result = project.builder("up")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().endswith(
        f"storage.local: {project.root / 'models'} is not writable here (merge and create write the merged model and ollama's "
        "store there); make it writable, or set storage.model_cache to a folder on this machine's disk"), result.stderr
    assert not (project.prefix / "runtime.json").exists(), "refused before anything was staged"


def test_a_damaged_or_deleted_cache_is_rebuilt_from_the_share_never_served(project: HostProject, share: Path) -> None:
    cache = with_cache(project)
    assert project.builder("up").returncode == 0
    merged = cache / "tiny" / "tiny.gguf"
    expected, _ = greedy(llama_cpp_bin_dir(), merged, PROMPT, 8)
    whole = merged.stat().st_size
    assert project.builder("down").returncode == 0

    os.truncate(merged, whole // 2)  # the blob is the same file: it is truncated too
    mount = project.root / "models"
    read = rclone_reads(mount)
    result = project.builder("up")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merge: joining 3 shards" in result.stderr, result.stderr
    assert rclone_reads(mount) - read >= whole - MIB, "the merged file was rebuilt from the share"
    assert merged.stat().st_size == whole
    blob = max((cache / "ollama" / "blobs").glob("sha256-*"), key=lambda p: p.stat().st_size)
    assert os.path.samefile(blob, merged), "the store's blob is the new merged file, not the truncated one"
    answer = post(f"{project.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
    assert answer["response"] == expected
    assert project.builder("down").returncode == 0

    import shutil

    shutil.rmtree(cache)
    result = project.builder("up")
    assert result.returncode == 0, result.stderr[-3000:]
    assert merged.stat().st_size == whole and (cache / "ollama" / "manifests").is_dir()
    answer = post(f"{project.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
    assert answer["response"] == expected


def test_a_model_cache_on_the_model_storage_is_refused(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    config = tmp_path / "builder.yaml"
    data = yaml.safe_load(config.read_text())
    for cache, why in (("models", "is the model storage"), ("models/cache", "is inside or above the model storage"),
                       (".", "is inside or above the model storage")):
        data["storage"]["model_cache"] = cache
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        result = run_builder("validate", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"storage.model_cache: {(tmp_path / cache).resolve()} {why} ({tmp_path / 'models'})" in result.stderr, result.stderr


def test_every_target_mounts_the_cache_and_only_reads_the_model_storage(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    assert run_builder("sample-model", cwd=tmp_path).returncode == 0
    config = tmp_path / "builder.yaml"
    data = yaml.safe_load(config.read_text())
    data["storage"]["model_cache"] = "/var/cache/builder-test"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "ctx"
    result = run_builder("render", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    compose = yaml.safe_load((out / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        mounts = {m["target"]: m for m in service["volumes"]}
        assert mounts["/models"].get("read_only") is True, name
        assert mounts["/cache"]["type"] == "bind" and mounts["/cache"]["source"] == "/var/cache/builder-test", name
        assert mounts["/cache"].get("read_only", False) is (name == "serve"), name
        assert service["environment"]["BUILDER_MODEL_CACHE"] == "/cache", name
    single = tmp_path / "single-ctx"
    assert run_builder("render", "--target", "single", "--out", str(single), cwd=tmp_path).returncode == 0
    run = (single / "single" / "run.sh").read_text()
    assert "type=bind,source=/var/cache/builder-test,target=/cache" in run and "target=/models,readonly" in run
    assert "BUILDER_MODEL_CACHE=/cache" in run
    assert "BUILDER_MODEL_CACHE" not in (single / "single" / "autodl.sh").read_text(), "AutoDL's data disk is local already"
    # The image does not depend on where the model is cached.
    data["storage"].pop("model_cache")
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    plain = tmp_path / "plain"
    assert run_builder("render", "--out", str(plain), cwd=tmp_path).returncode == 0
    image_files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))  # noqa: E731
                                if p.is_file() and (p.name == "Dockerfile" or "rootfs" in p.parts)}
    assert image_files(out) == image_files(plain)


def test_kubernetes_puts_the_cache_on_the_nodes_disk(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    config = tmp_path / "builder.yaml"
    data = yaml.safe_load(config.read_text())
    data["storage"]["model_cache"] = "/mnt/nvme/builder"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "k8s"
    result = run_builder("render", "--target", "kubernetes", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    docs = [d for f in sorted(out.rglob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict) and "kind" in d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {"name": "cache", "hostPath": {"path": "/mnt/nvme/builder", "type": "Directory"}} in pod["volumes"]
    for container in pod["initContainers"] + pod["containers"]:
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"].get("readOnly") is True, container["name"]
        assert mounts["/cache"].get("readOnly", False) is (container["name"] == "serve"), container["name"]
        assert {"name": "BUILDER_MODEL_CACHE", "value": "/cache"} in container["env"], container["name"]
    assert "chown 1000:1000 /mnt/nvme/builder" in result.stderr + "".join(p.read_text() for p in out.rglob("*.md"))


def test_current_ollama_copies_the_shards_into_the_cache_once(project: HostProject, share: Path, tmp_path: Path) -> None:
    """ollama 0.30+ creates from the shards, and a hard link cannot cross
    from the share to the cache: each shard is read from the share once (an
    upload to ollama's store in the cache), ollama rewrites them there, and
    a restart reads nothing from the share."""
    cache = with_cache(project)
    carried = project.use_current_ollama(tmp_path / "carried")
    before = tree(share)
    shards = sum(size for size, _ in before.values())
    mount = project.root / "models"

    read = rclone_reads(mount)
    first = project.builder("up", "--offline", "--from", str(carried))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("copied from the model volume in") == 3, first.stderr  # hashed as copied: one read
    assert shards <= rclone_reads(mount) - read < 1.1 * shards, "each shard read once: hashed as it is copied"
    assert tree(share) == before
    store = cache / "ollama" / "blobs"
    from builder.supervisor.create import referenced_digests

    assert {p.name for p in store.iterdir()} == {f"sha256-{d}" for d in referenced_digests(str(cache / "ollama"))}, \
        "the uploaded shards are gone once ollama rewrote them"
    expected, _ = greedy(llama_cpp_bin_dir(), share / "tiny" / "tiny-00001-of-00003.gguf", PROMPT, 8)
    answer = post(f"{project.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
    assert answer["response"] == expected

    assert project.builder("down").returncode == 0
    read = rclone_reads(mount)
    again = project.builder("up", "--offline", "--from", str(carried))
    assert again.returncode == 0, again.stderr[-3000:]
    assert rclone_reads(mount) - read < MIB
    assert post(f"{project.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False,
                                                 "options": {"num_predict": 8}})["response"] == expected


def test_a_share_without_hard_links_is_not_linked_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """rclone's read-write mount has no hard links and answers link() with
    EIO: place_blob says the blob is not linked (create then uploads it)
    instead of stopping, and leaves no probe or temporary file on the share."""
    from builder.supervisor.common import place_blob

    source = tmp_path / "share"
    source.mkdir()
    (source / "merged.gguf").write_bytes(b"GGUF" + bytes(4092))
    with throttled(source, tmp_path / "mnt", "400M", tmp_path / "rclone.log", writable=True) as mount:
        how = place_blob(str(mount / "merged.gguf"), str(mount / "ollama"), "ab" * 32)
        left = sorted(p.name for p in (mount / "ollama" / "blobs").iterdir())
    assert how == "not linked (this file system answers every link() with an I/O error: it has no hard links)", how
    assert left == [], left


def test_an_i_o_error_on_a_disk_that_links_stays_an_error(tmp_path: Path, monkeypatch) -> None:
    """EIO from link() on a file system that does make links (the probe
    links) is a failing disk, not a missing feature: it is raised."""
    import errno

    from builder.supervisor import common

    merged = tmp_path / "merged.gguf"
    merged.write_bytes(b"GGUF" + bytes(4092))
    real_link = os.link

    def failing(src, dst, *args, **kwargs):
        if os.fspath(src) == str(merged):
            raise OSError(errno.EIO, "Input/output error")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(common.os, "link", failing)
    with pytest.raises(OSError) as caught:
        common.place_blob(str(merged), str(tmp_path / "ollama"), "cd" * 32)
    assert caught.value.errno == errno.EIO
    assert sorted(p.name for p in (tmp_path / "ollama" / "blobs").iterdir()) == []
