"""ollama 0.30 and later on the real engine: the release is a .tar.zst, the
shards are never merged, ollama's create rewrites them (llama-quantize COPY,
the real llama.cpp tool in the test archive) into one blob, and the stack
answers with llama.cpp's own greedy text. Compose, then the single target."""

from __future__ import annotations

import json
import urllib.request

import pytest

from builder.supervisor.create import referenced_digests
from tests.engine.conftest import TinyStack, docker
from tests.engine.test_main_job import post
from tests.fixtures.llama_cpp_release import llama_cpp_bin_dir
from tests.fixtures.ollama_release import CURRENT_VERSION, ollama_release_tar_zst
from tests.test_sample_model import greedy

pytestmark = pytest.mark.engine
CURRENT_PATH = f"/ollama/ollama/releases/download/v{CURRENT_VERSION}/ollama-linux-amd64.tar.zst"
PROMPT = "Why is the sky blue?"


@pytest.fixture
def current_stack(release_server, shared_cache, tmp_path):
    release_server.files[CURRENT_PATH] = ollama_release_tar_zst(CURRENT_VERSION)
    stack = TinyStack(tmp_path, release_server, shared_cache)
    text = stack.config.read_text(encoding="utf-8")
    # The URL as the default has it for this version, on the test server.
    text = text.replace("/v{version}/ollama-linux-amd64.tgz", "/v{version}/ollama-linux-amd64.tar.zst")
    stack.config.write_text(text.replace("ollama:\n", f"ollama:\n  version: {CURRENT_VERSION}\n"), encoding="utf-8")
    yield stack
    stack.down()


def _no_unreferenced_blob(stack: TinyStack) -> None:
    store = stack.root / "models" / "ollama"
    on_disk = {p.name for p in (store / "blobs").iterdir()}
    assert on_disk == {f"sha256-{d}" for d in referenced_digests(str(store))}, on_disk


def test_current_ollama_serves_split_shards_without_a_merge(current_stack: TinyStack) -> None:
    shards = current_stack.write_model()
    contents = [p.read_bytes() for p in shards]
    result = current_stack.builder("up")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"{current_stack.url} serves tiny:latest"
    assert "ollama-linux-amd64.tar.zst" in result.stderr
    with urllib.request.urlopen(f"{current_stack.url}/api/version", timeout=10) as response:
        assert json.loads(response.read()) == {"version": CURRENT_VERSION}
    # No merge: the merge service only checked the shards; nothing but the shards in their folder.
    assert sorted(p.name for p in current_stack.models.iterdir()) == [p.name for p in shards]
    merge_logs = current_stack.builder("logs", "merge").stdout
    assert "3 shards checked" in merge_logs and "nothing is merged" in merge_logs
    create_logs = current_stack.builder("logs", "create").stdout
    assert "ollama rewrote the 3 shard(s) into one blob" in create_logs
    _no_unreferenced_blob(current_stack)
    assert [p.read_bytes() for p in shards] == contents
    # A real forward pass over the blob ollama wrote: llama.cpp's greedy text of the shards.
    expected, _ = greedy(llama_cpp_bin_dir(), shards[0], PROMPT, 8)
    answer = post(f"{current_stack.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
    assert (answer["response"], answer["eval_count"]) == (expected, 8)
    status = json.loads(current_stack.builder("status", "--json").stdout)
    assert status["created"]["path"] == "shards" and status["created"]["inputs"] == 3 and status["created"]["written"] > 0
    # Again: nothing to do (ollama touched the shards through their links: still up to date).
    again = current_stack.builder("up")
    assert again.returncode == 0, again.stderr
    assert "is up to date with its 3 shard(s) and its create request; nothing to do" in again.stderr
    _no_unreferenced_blob(current_stack)

    # The single target follows the same path in one container.
    assert current_stack.builder("down").returncode == 0
    single = current_stack.builder("up", "--target", "single")
    assert single.returncode == 0, single.stderr[-3000:]
    logs = docker("logs", current_stack.project).stdout
    assert "nothing is merged" in logs and "nothing to do" in logs
    answer = post(f"{current_stack.url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
    assert (answer["response"], answer["eval_count"]) == (expected, 8)
    assert current_stack.builder("down", "--target", "single").returncode == 0
