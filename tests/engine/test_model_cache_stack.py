"""storage.model_cache on the real engine: Compose and the single container
mount the cache read-write for merge and create, read-only for serve, and
the model storage read-only for all, so storage the containers' user cannot
write is enough (tests/test_model_cache.py covers the host target, the
bytes read from a throttled share, and a damaged cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.engine.conftest import TinyStack, docker
from tests.fixtures.llama_cpp_release import llama_cpp_bin_dir
from tests.test_sample_model import greedy

pytestmark = pytest.mark.engine


def _generate(url: str) -> dict:
    import urllib.request

    body = json.dumps({"model": "tiny", "prompt": "one box", "stream": False, "options": {"num_predict": 8}}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/generate", data=body), timeout=120) as response:
        return json.loads(response.read())


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_compose_and_single_write_only_to_the_model_cache(tiny_stack: TinyStack) -> None:
    tiny_stack.write_model()
    storage = tiny_stack.root / "models"
    tiny_stack.own(0, 0)
    for path in [storage, *storage.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)  # the containers' user 1000 can only read it
    tiny_stack.config.write_text(tiny_stack.config.read_text().replace(
        "  local: ./models\n", "  local: ./models\n  model_cache: ./node-disk/builder\n"))
    cache = tiny_stack.root / "node-disk" / "builder"
    before = _tree(storage)

    result = tiny_stack.builder("up")
    assert result.returncode == 0, result.stderr[-3000:]
    assert cache.is_dir() and (cache.stat().st_uid, cache.stat().st_gid) == (1000, 1000), "up made the cache for the containers' user"
    merged = cache / "tiny" / "tiny.gguf"
    blob = max((cache / "ollama" / "blobs").glob("sha256-*"), key=lambda p: p.stat().st_size)
    assert os.path.samefile(blob, merged), "zero-copy create inside the cache"
    assert _tree(storage) == before, "nothing was written to the model storage"
    expected, _ = greedy(llama_cpp_bin_dir(), merged, "one box", 8)
    assert _generate(tiny_stack.url)["response"] == expected
    serve = tiny_stack.inspect("serve")
    mounts = {m["Destination"]: m for m in serve["Mounts"]}
    assert mounts["/cache"]["Source"] == str(cache) and mounts["/cache"]["RW"] is False
    assert mounts["/models"]["RW"] is False
    assert {m["Destination"]: m["RW"] for m in tiny_stack.inspect("merge")["Mounts"]} == {"/models": False, "/cache": True}
    status = json.loads(tiny_stack.builder("status", "--json").stdout)
    assert status["reads"]["place"] == "model cache" and status["reads"]["where"] == str(cache)

    assert tiny_stack.builder("down").returncode == 0
    single = tiny_stack.builder("up", "--target", "single")
    assert single.returncode == 0, single.stderr[-3000:]
    logs = docker("logs", tiny_stack.project).stdout
    assert f"merge: /cache/tiny/tiny.gguf is up to date with its 3 shards; nothing to do" in logs, logs
    assert _generate(tiny_stack.url)["response"] == expected
    assert _tree(storage) == before
