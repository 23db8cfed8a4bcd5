"""`builder fetch` and `builder lock` against a local release server, through
the same code path a user's download takes (httpx + tenacity, Range resume,
the GitHub mirror prefix, the lock, offline mode)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from tests.fixtures.artifact_server import ArtifactServer, Fault
from tests.fixtures.ollama_release import ollama_release_tgz
from tests.helpers import run_builder, tree_snapshot

OLLAMA_PATH = "/ollama/ollama/releases/download/v0.5.7/ollama-linux-amd64.tgz"
LLAMA_PATH = "/ggml-org/llama.cpp/releases/download/b4610/llama-b4610-bin-ubuntu-x64.zip"


def small_llama_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("build/bin/llama-gguf-split", (2025, 2, 1, 0, 0, 0)), b"\x7fELF not really" * 5000)
    return buffer.getvalue()


@pytest.fixture
def server():
    srv = ArtifactServer(files={OLLAMA_PATH: ollama_release_tgz(), LLAMA_PATH: small_llama_zip()}).start()
    yield srv
    srv.stop()


class Project:
    def __init__(self, root: Path, server: ArtifactServer, mirror: bool = False):
        self.root = root
        self.cache = root / "cache"
        self.server = server
        base = "https://github.com" if mirror else server.url
        text = (
            "version: 1\nmodel:\n  name: tiny\n  shards: tiny/tiny-00001-of-00003.gguf\nstorage:\n  local: ./models\n"
            f"ollama:\n  url: {base}/ollama/ollama/releases/download/v{{version}}/ollama-linux-amd64.tgz\n"
            f"llama_cpp:\n  url: {base}/ggml-org/llama.cpp/releases/download/{{build}}/llama-{{build}}-bin-ubuntu-x64.zip\n"
        )
        if mirror:
            text += f"mirrors:\n  github: {server.url}/\n"
        (root / "builder.yaml").write_text(text)

    def builder(self, *args: str):
        env = {"BUILDER_CACHE_DIR": str(self.cache), "BUILDER_RETRIES": "4", "BUILDER_RETRY_WAIT": "0.01", "NO_PROXY": "127.0.0.1"}
        return run_builder(*args, cwd=self.root, env=env)

    def lock(self) -> dict:
        return json.loads((self.root / "builder.lock").read_text())["artifacts"]

    def cached(self) -> list[str]:
        folder = self.cache / "artifacts"
        return sorted(p.name for p in folder.glob("sha256-*")) if folder.exists() else []


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_fills_the_cache_and_writes_the_lock(tmp_path: Path, server: ArtifactServer) -> None:
    project = Project(tmp_path, server)
    result = project.builder("fetch")
    assert result.returncode == 0, result.stderr
    lock = project.lock()
    assert lock["ollama"]["sha256"] == sha(server.files[OLLAMA_PATH])
    assert lock["llama_cpp"]["sha256"] == sha(server.files[LLAMA_PATH])
    assert lock["ollama"]["url"].endswith(OLLAMA_PATH)
    assert project.cached() == sorted(f"sha256-{sha(b)}" for b in server.files.values())
    # Not on a terminal: plain lines only, no carriage returns.
    assert "\r" not in result.stderr and "ollama-linux-amd64.tgz: done" in result.stderr
    requests = len(server.requests)
    again = project.builder("fetch")
    assert again.returncode == 0 and len(server.requests) == requests, "a warm fetch must not download"


def test_github_mirror_prefix_is_applied(tmp_path: Path, server: ArtifactServer) -> None:
    server.files = {f"/https://github.com{k}": v for k, v in server.files.items()}
    project = Project(tmp_path, server, mirror=True)
    result = project.builder("fetch")
    assert result.returncode == 0, result.stderr
    assert {path for path, _ in server.requests} == {f"/https://github.com{OLLAMA_PATH}", f"/https://github.com{LLAMA_PATH}"}
    # The lock records the canonical URL, not the mirror's.
    assert project.lock()["ollama"]["url"] == f"https://github.com{OLLAMA_PATH}"


def test_cut_connection_resumes_with_range(tmp_path: Path, server: ArtifactServer) -> None:
    server.faults[OLLAMA_PATH] = Fault("cut")
    project = Project(tmp_path, server)
    result = project.builder("fetch")
    assert result.returncode == 0, result.stderr
    ranges = [r for p, r in server.requests if p == OLLAMA_PATH]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert "attempt 1 failed" in result.stderr
    assert project.lock()["ollama"]["sha256"] == sha(server.files[OLLAMA_PATH])


def test_server_without_range_restarts_cleanly(tmp_path: Path, server: ArtifactServer) -> None:
    server.faults[OLLAMA_PATH] = Fault("cut")
    project = Project(tmp_path, server)
    server.faults[OLLAMA_PATH] = Fault("cut", times=1)
    # After the cut, the server ignores Range: the download must start over, not append.
    original = server._take_fault

    def take(path: str):
        kind = original(path)
        return kind if kind else ("norange" if path == OLLAMA_PATH else None)

    server._take_fault = take
    result = project.builder("fetch")
    assert result.returncode == 0, result.stderr
    assert project.lock()["ollama"]["sha256"] == sha(server.files[OLLAMA_PATH])


def test_5xx_is_retried(tmp_path: Path, server: ArtifactServer) -> None:
    server.faults[LLAMA_PATH] = Fault("error", times=2)
    project = Project(tmp_path, server)
    result = project.builder("fetch")
    assert result.returncode == 0, result.stderr
    assert sum(1 for p, _ in server.requests if p == LLAMA_PATH) == 3
    assert "HTTP 500" in result.stderr


def test_wrong_bytes_are_refused_and_not_kept(tmp_path: Path, server: ArtifactServer) -> None:
    project = Project(tmp_path, server)
    assert project.builder("lock").returncode == 0
    lock_before = (tmp_path / "builder.lock").read_bytes()
    for path in (project.cache / "artifacts").glob("sha256-*"):
        path.unlink()
    server.faults[OLLAMA_PATH] = Fault("wrong", times=-1)
    result = project.builder("fetch")
    assert result.returncode == 1
    expected = sha(server.files[OLLAMA_PATH])
    bad = server.files[OLLAMA_PATH]
    bad = sha(bytes(b ^ 0xFF for b in bad[:64]) + bad[64:])
    assert result.stderr.splitlines()[-1] == (
        f"error: checksum mismatch for {server.url}{OLLAMA_PATH}: expected sha256 {expected}, got {bad}; "
        "the file was not kept (check mirrors.github, or ollama.sha256 and builder.lock)"
    )
    assert f"sha256-{bad}" not in project.cached() and f"sha256-{expected}" not in project.cached()
    assert list((project.cache / "artifacts" / "partial").iterdir()) == []
    assert (tmp_path / "builder.lock").read_bytes() == lock_before


def test_offline_with_an_empty_cache(tmp_path: Path, server: ArtifactServer) -> None:
    project = Project(tmp_path, server)
    result = project.builder("fetch", "--offline")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("error: offline: llama-b4610-bin-ubuntu-x64.zip is not in the cache")
    assert server.requests == []


def test_offline_from_carried_folder(tmp_path: Path, server: ArtifactServer) -> None:
    carried = tmp_path / "usb"
    carried.mkdir()
    (carried / "ollama-linux-amd64.tgz").write_bytes(server.files[OLLAMA_PATH])
    (carried / "llama-b4610-bin-ubuntu-x64.zip").write_bytes(server.files[LLAMA_PATH])
    before = tree_snapshot(carried)
    project = Project(tmp_path, server)
    result = project.builder("fetch", "--offline", "--from", str(carried))
    assert result.returncode == 0, result.stderr
    assert server.requests == []
    assert tree_snapshot(carried) == before
    assert project.lock()["ollama"]["sha256"] == sha(server.files[OLLAMA_PATH])


def test_carried_file_with_wrong_digest(tmp_path: Path, server: ArtifactServer) -> None:
    project = Project(tmp_path, server)
    assert project.builder("lock").returncode == 0
    for path in (project.cache / "artifacts").glob("sha256-*"):
        path.unlink()
    carried = tmp_path / "usb"
    carried.mkdir()
    (carried / "ollama-linux-amd64.tgz").write_bytes(b"tampered")
    (carried / "llama-b4610-bin-ubuntu-x64.zip").write_bytes(server.files[LLAMA_PATH])
    result = project.builder("fetch", "--offline", "--from", str(carried))
    assert result.returncode == 1
    assert f"checksum mismatch for {carried}/ollama-linux-amd64.tgz" in result.stderr


def test_unreachable_mirror(tmp_path: Path, server: ArtifactServer) -> None:
    project = Project(tmp_path, server)
    server.stop()
    result = project.builder("fetch")
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: cannot download {server.url}{LLAMA_PATH} after 4 attempts (")
    assert "check the network, the proxy variables or mirrors.github" in last


def test_missing_release_is_not_retried(tmp_path: Path, server: ArtifactServer) -> None:
    del server.files[OLLAMA_PATH]
    project = Project(tmp_path, server)
    result = project.builder("fetch")
    assert result.returncode == 1
    assert f"error: {server.url}{OLLAMA_PATH} answered HTTP 404" in result.stderr
    assert sum(1 for p, _ in server.requests if p == OLLAMA_PATH) == 1


def test_hand_edited_lock_is_refused(tmp_path: Path, server: ArtifactServer) -> None:
    project = Project(tmp_path, server)
    assert project.builder("fetch").returncode == 0
    lock = tmp_path / "builder.lock"
    lock.write_text(lock.read_text().replace('"sha256": "', '"sha256": "zz', 1))
    before = lock.read_bytes()
    result = project.builder("fetch")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: builder.lock: artifacts.llama_cpp must have url, sha256 (64 lowercase hex) and size; "
        "fix it or delete it and run `builder lock`"
    )
    assert lock.read_bytes() == before


def test_lock_pins_later_fetches(tmp_path: Path, server: ArtifactServer) -> None:
    project = Project(tmp_path, server)
    assert project.builder("lock").returncode == 0
    # The release is replaced upstream: the lock catches it.
    for path in (project.cache / "artifacts").glob("sha256-*"):
        path.unlink()
    for path in (project.cache / "artifacts" / "by-url").iterdir():
        path.unlink()
    server.files[LLAMA_PATH] = small_llama_zip() + b"changed"
    result = project.builder("fetch")
    assert result.returncode == 1 and "checksum mismatch" in result.stderr
    # `builder lock` is the deliberate way to accept the new bytes.
    assert project.builder("lock").returncode == 0
    assert project.lock()["llama_cpp"]["sha256"] == sha(server.files[LLAMA_PATH])


def test_resume_at_the_wrong_offset_starts_over(tmp_path: Path, server: ArtifactServer) -> None:
    """A server that answers a Range request from byte 0 with 206 must not
    have its bytes appended (nor taken for the whole file)."""
    server.faults[OLLAMA_PATH] = Fault("cut")
    original = server._take_fault
    state = {"lied": False}

    def take(path: str):
        kind = original(path)
        if kind is None and path == OLLAMA_PATH and not state["lied"]:
            state["lied"] = True
            return "wrong-range"
        return kind

    server._take_fault = take
    project = Project(tmp_path, server)
    result = project.builder("fetch")
    assert result.returncode == 0, result.stderr
    assert "instead of" in result.stderr
    assert project.lock()["ollama"]["sha256"] == sha(server.files[OLLAMA_PATH])


def test_lock_downloads_again(tmp_path: Path, server: ArtifactServer) -> None:
    project = Project(tmp_path, server)
    assert project.builder("fetch").returncode == 0
    before = len(server.requests)
    assert project.builder("lock").returncode == 0
    assert len(server.requests) == before + 2, "`builder lock` records what it fetches now"


def test_unknown_host_fails_at_once_naming_the_mirror_and_offline(tmp_path: Path, server: ArtifactServer) -> None:
    # The default URLs name github.com; this machine resolves no such name.
    # The network guard answers the lookup as DNS would ("unknown name") and
    # records it: exactly one lookup means no retry.
    (tmp_path / "builder.yaml").write_text(
        "version: 1\nmodel:\n  name: tiny\n  shards: tiny/tiny-00001-of-00003.gguf\nstorage:\n  local: ./models\n"
    )
    log = tmp_path / "netguard.log"
    env = {"BUILDER_CACHE_DIR": str(tmp_path / "cache"), "BUILDER_RETRIES": "4", "BUILDER_RETRY_WAIT": "0.01", "TESTS_NETGUARD_LOG": str(log)}
    result = run_builder("fetch", cwd=tmp_path, env=env)
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: cannot download https://github.com/") and "the host github.com is unknown here" in last, last
    assert "set mirrors.github (or BUILDER_MIRROR_GITHUB)" in last and "--offline --from DIR" in last
    assert "retrying" not in result.stderr
    lookups = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(entry["kind"], entry["target"]) for entry in lookups] == [("name lookup of", "github.com")]
