"""The supervisor's create role on the host, against the ollama double
(unpacked from the test release archive, so its runner is real llama.cpp),
on a store that other models share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from builder.sample import write_split_model
from builder.supervisor.create import create, referenced_digests
from builder.supervisor.merge import merge, merged_digest
from tests.fixtures.ollama_release import unpack_ollama_release


@pytest.fixture(scope="module")
def ollama(tmp_path_factory) -> Path:
    return unpack_ollama_release(tmp_path_factory.mktemp("release"))


def runtime_for(models: Path, ollama: Path) -> dict:
    return {
        "shards": {"first": str(models / "tiny" / "tiny-00001-of-00003.gguf"), "count": 3, "prefix": "tiny"},
        "merged": str(models / "tiny" / "tiny.gguf"),
        "merge_tool": "builder",
        "model": "tiny:latest",
        "ollama": str(ollama),
        "ollama_store": str(models / "ollama"),
        "create": {"parameters": {"temperature": 0}, "template": "{{ .Prompt }}"},
    }


def blobs(store: Path) -> dict[str, int]:
    return {p.name.removeprefix("sha256-"): p.stat().st_size for p in (store / "blobs").iterdir() if p.name.startswith("sha256-")}


def merged_and_created(tmp_path: Path, ollama: Path) -> tuple[dict, Path, str]:
    """tiny merged from seed-0 shards and created; (runtime, store, model digest)."""
    runtime = runtime_for(tmp_path / "models", ollama)
    write_split_model(tmp_path / "models" / "tiny", "tiny", 3, seed=0)
    assert merge(runtime) == 0 and create(runtime) == 0
    return runtime, tmp_path / "models" / "ollama", merged_digest(runtime["merged"])


def test_re_create_after_a_re_merge_leaves_no_unreferenced_blob_and_spares_other_models(tmp_path: Path, ollama: Path) -> None:
    runtime, store, first = merged_and_created(tmp_path, ollama)
    models = tmp_path / "models"

    # A second model in the same store, created by the user by hand from a
    # copy of the first merged file: it shares the model blob with tiny v1.
    shared = tmp_path / "shared.gguf"
    shared.write_bytes(Path(runtime["merged"]).read_bytes())
    (tmp_path / "Modelfile").write_text(f"FROM {shared}\nPARAMETER num_ctx 256\n", encoding="utf-8")
    env = {**os.environ, "OLLAMA_MODELS": str(store), "OLLAMA_HOST": "127.0.0.1:0", "OLLAMA_NOPRUNE": "1"}
    from builder.supervisor.ollama import PrivateServer

    with PrivateServer(str(ollama), str(store)) as server:
        made = subprocess.run([str(ollama), "create", "other", "-f", str(tmp_path / "Modelfile")],
                              env={**env, "OLLAMA_HOST": server.host}, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    other_manifest = store / "manifests" / "registry.ollama.ai" / "library" / "other" / "latest"
    assert other_manifest.is_file()
    tiny_v1 = referenced_digests(str(store))
    assert first in tiny_v1

    # New shards (the user replaced the model), merged and created again.
    write_split_model(models / "tiny", "tiny", 3, seed=1)
    assert merge(runtime) == 0 and create(runtime) == 0
    second = merged_digest(runtime["merged"])
    assert second != first

    present = blobs(store)
    referenced = referenced_digests(str(store))
    assert set(present) == referenced, "a blob no manifest references was left behind (or a referenced one is gone)"
    assert first in present, "the old model blob is still other's model layer: it must stay"
    assert second in present
    # tiny's old config blob is gone; other's layers are all still there.
    import json

    other = json.loads(other_manifest.read_text())
    assert all(layer["digest"].partition(":")[2] in present for layer in other["layers"])


def test_re_create_frees_the_old_model_blob_when_no_one_else_uses_it(tmp_path: Path, ollama: Path, capsys) -> None:
    runtime, store, first = merged_and_created(tmp_path, ollama)
    models = tmp_path / "models"
    before = set(blobs(store))
    write_split_model(models / "tiny", "tiny", 3, seed=1)
    assert merge(runtime) == 0 and create(runtime) == 0
    after = blobs(store)
    assert first not in after and set(after) == referenced_digests(str(store))
    assert len(after) == len(before)  # same layer kinds, new model blob and config blob
    out = capsys.readouterr().out
    assert f"create: removed blob sha256-{first[:12]}..." in out


def test_a_failed_create_shows_the_private_ollama_s_last_lines(tmp_path: Path, ollama: Path, capsys) -> None:
    from builder.supervisor.common import StepError

    runtime = runtime_for(tmp_path / "models", ollama)
    write_split_model(tmp_path / "models" / "tiny", "tiny", 3)
    assert merge(runtime) == 0
    runtime["model"] = "Not A Valid Name!"
    capsys.readouterr()
    with pytest.raises(StepError, match=r"^create: ollama refused to create Not A Valid Name! \(HTTP 400"):
        create(runtime)
    out = capsys.readouterr().out
    log = tmp_path / "models" / "ollama" / ".builder-create.log"
    assert f"create: the private ollama's last lines (all of them in {log}):" in out
    assert '"/api/create"' in out  # its request line, from the log's tail
    assert "[GIN-debug]" in log.read_text() and "[GIN-debug]" not in out.split("last lines")[0]
    assert (tmp_path / "models" / "ollama" / ".builder-home").stat().st_mode & 0o777 == 0o700
