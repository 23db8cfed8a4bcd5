"""The supervisor's create role on the host, against the ollama double
(unpacked from the test release archive, so its runner is real llama.cpp),
on a store that other models share."""

from __future__ import annotations

import hashlib
import json
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


# ollama 0.30 and later: no merge; the shards are hard-linked into the store and
# ollama's create rewrites them (llama-quantize COPY) into one new blob.


@pytest.fixture(scope="module")
def ollama_current(tmp_path_factory) -> Path:
    return unpack_ollama_release(tmp_path_factory.mktemp("release-current"), version="0.32.15")


def test_current_ollama_creates_from_the_shards_and_leaves_no_unreferenced_blob(tmp_path: Path, ollama_current: Path, capsys) -> None:
    from builder.supervisor.gguf import read_header_file

    models = tmp_path / "models"
    runtime = dict(runtime_for(models, ollama_current), ollama_generation="0.30")
    shards = write_split_model(models / "tiny", "tiny", 3, seed=0)
    contents = [p.read_bytes() for p in shards]
    assert merge(runtime) == 0
    assert not Path(runtime["merged"]).exists(), "no merge with a current ollama"
    assert sorted(p.name for p in (models / "tiny").iterdir()) == [p.name for p in shards]
    assert create(runtime) == 0
    out = capsys.readouterr().out
    assert "ollama rewrote the 3 shard(s) into one blob" in out
    store = models / "ollama"
    manifest = json.loads((store / "manifests/registry.ollama.ai/library/tiny/latest").read_text())
    model_layer = next(l for l in manifest["layers"] if l["mediaType"] == "application/vnd.ollama.image.model")
    shard_digests = {hashlib.sha256(c).hexdigest() for c in contents}
    assert model_layer["digest"][7:] not in shard_digests and "from" not in model_layer
    assert "rootfs" not in json.loads((store / "blobs" / manifest["config"]["digest"].replace(":", "-")).read_text())
    # Nothing unreferenced (no shard link, no temporary file), and the shards are as they were.
    assert set(blobs(store)) == referenced_digests(str(store))
    assert [p.name for p in (store / "blobs").iterdir() if not p.name.startswith("sha256-")] == []
    assert [p.read_bytes() for p in shards] == contents and all(p.stat().st_nlink == 1 for p in shards)
    # The one model blob is what llama-quantize made of the shards: one file, no split keys, every tensor.
    header = read_header_file(str(store / "blobs" / model_layer["digest"].replace(":", "-")))
    assert header.split_count in (None, 0) and "general.quantization_version" in header.metadata
    assert header.tensor_count == sum(read_header_file(str(p)).tensor_count for p in shards)
    # ollama touched the shards through their links; a second create still has nothing to do.
    assert create(runtime) == 0
    assert "is up to date with its 3 shard(s)" in capsys.readouterr().out


def test_current_ollama_refuses_a_lone_first_shard(tmp_path: Path, ollama_current: Path) -> None:
    """v0.32.15 server/create.go:1165, through the double's own client (`FROM first-shard`)."""
    models = tmp_path / "models"
    shards = write_split_model(models / "tiny", "tiny", 3, seed=0)
    (tmp_path / "Modelfile").write_text(f"FROM {shards[0]}\n", encoding="utf-8")
    store = tmp_path / "store"
    from builder.supervisor.ollama import PrivateServer

    with PrivateServer(str(ollama_current), str(store)) as server:
        env = {**os.environ, "OLLAMA_HOST": server.host}
        result = subprocess.run([str(ollama_current), "create", "tiny", "-f", str(tmp_path / "Modelfile")],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert 'Error: split GGUF "tiny-00001-of-00003.gguf" has 1 shards, expected 3' in result.stderr
        folder = tmp_path / "Modelfile.dir"
        folder.write_text(f"FROM {models / 'tiny'}\n", encoding="utf-8")
        result = subprocess.run([str(ollama_current), "create", "tiny", "-f", str(folder)],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr


def test_current_ollama_uploads_a_shard_it_may_not_touch_and_says_so(tmp_path: Path, ollama_current: Path, capsys, monkeypatch) -> None:
    """ollama 0.30+ sets the times of its input blobs (owner only): a shard the
    containers' user does not own is uploaded instead of linked, and the
    uploaded copies are removed once ollama has written its own blob."""
    import builder.supervisor.create_shards as create_shards

    models = tmp_path / "models"
    runtime = dict(runtime_for(models, ollama_current), ollama_generation="0.30")
    shards = write_split_model(models / "tiny", "tiny", 3, seed=0)
    owner = shards[0].stat().st_uid
    # As root on a root_squash export, or a user who does not own them: their times cannot be set.
    monkeypatch.setattr(create_shards, "may_set_times", lambda path: False)
    assert create(runtime) == 0
    out = capsys.readouterr().out
    assert f"not linked (owned by uid {owner}, and this ollama sets its input blobs' times; chown it to uid {os.geteuid()}" in out
    assert "uploading" in out
    store = models / "ollama"
    from builder.supervisor.create import created_summary
    from builder.targets.status import status_lines

    summary = created_summary(str(store), "tiny:latest")
    assert summary["path"] == "shards" and summary["uploaded"] == sum(p.stat().st_size for p in shards)
    report = {"image": "i", "image_id": None, "image_stale": None, "services": {}, "endpoint": "e", "model": "tiny:latest",
              "model_listed": True, "loaded": None, "created": summary}
    assert any(line.startswith("created   from 3 shard(s), no merge: ollama wrote ") and "uploaded (no hard link possible)" in line
               for line in status_lines(report))
    assert set(blobs(store)) == referenced_digests(str(store))
    assert all(p.stat().st_nlink == 1 for p in shards)


def test_a_failed_current_create_leaves_no_link_and_no_second_hash(tmp_path: Path, ollama_current: Path, capsys) -> None:
    """ollama 0.30+ touches the shards before llama-quantize runs: when the
    create then fails, the links go and the shards' new times are recorded
    (the next run does not hash 150 GB again); ollama's temporaries of a
    killed create are removed before the next one."""
    import shutil

    from builder.supervisor.common import StepError
    from builder.supervisor.create_shards import SHARD_DIGESTS

    release = tmp_path / "release"
    shutil.copytree(ollama_current.parent.parent, release, symlinks=True)
    quantize = release / "lib" / "ollama" / "llama-quantize"
    quantize.rename(quantize.with_name("llama-quantize.away"))
    models = tmp_path / "models"
    runtime = dict(runtime_for(models, release / "bin" / "ollama"), ollama_generation="0.30")
    shards = write_split_model(models / "tiny", "tiny", 3, seed=0)
    with pytest.raises(StepError, match=r"^create: ollama refused to create tiny:latest: failed to validate GGUF with llama-quantize .*llama-quantize binary not found"):
        create(runtime)
    store = models / "ollama"
    assert blobs(store) == {}, "the shard links stay only while a create needs them"
    record = json.loads((store / SHARD_DIGESTS).read_text())
    assert [record[str(p)]["mtime_ns"] for p in shards] == [p.stat().st_mtime_ns for p in shards]
    # A killed create of ollama's left its temporaries; the next create removes them and succeeds.
    (store / "blobs" / "COPY123456").write_bytes(b"x" * 1000)
    (store / "blobs" / "sha256-987654").write_bytes(b"y" * 1000)
    (store / "blobs" / "split-gguf-4242").mkdir()
    quantize.with_name("llama-quantize.away").rename(quantize)
    capsys.readouterr()
    assert create(runtime) == 0
    out = capsys.readouterr().out
    assert "removed 2.0 KiB of temporary files a stopped create of ollama left" in out
    assert sorted(p.name for p in (store / "blobs").iterdir()) == sorted(f"sha256-{d}" for d in referenced_digests(str(store)))


def test_current_create_refuses_when_the_rewrite_cannot_fit(tmp_path: Path, ollama_current: Path, monkeypatch) -> None:
    import builder.supervisor.create_shards as create_shards
    from builder.supervisor.common import StepError

    models = tmp_path / "models"
    runtime = dict(runtime_for(models, ollama_current), ollama_generation="0.30")
    write_split_model(models / "tiny", "tiny", 3, seed=0)
    real = os.statvfs

    class Small:
        def __init__(self, path):
            stats = real(path)
            self.f_frsize, self.f_bavail = 4096, 1

    monkeypatch.setattr(create_shards.os, "statvfs", Small)
    with pytest.raises(StepError, match=r"^create: this ollama writes the model \(458.7 KiB\) into .*/blobs twice before it deletes one copy: 917.4 KiB needed, 4.0 KiB free"):
        create(runtime)
    assert blobs(models / "ollama") == {} and not (models / "ollama" / "manifests").exists()


def test_a_model_padded_after_its_last_tensor_is_refused_by_ollama_and_never_reaches_it(tmp_path: Path, ollama: Path) -> None:
    """llama-gguf-split pads the last tensor to 32 bytes; ollama 0.5.7's
    create copies the decoded part, then reads the padding as a GGUF magic
    and fails ("invalid file magic": seen with a real 0.5.7 built from
    source). builder's merge ends the file at the last tensor, so create is
    zero-copy, and the model loads and answers as llama.cpp does."""
    import httpx

    from tests.fixtures.llama_cpp_release import llama_cpp_bin_dir
    from tests.helpers import free_port
    from tests.test_sample_model import greedy

    models = tmp_path / "models"
    runtime = runtime_for(models, ollama)
    write_split_model(models / "tiny", "tiny", 3, width=48, rope_freqs=True)  # a 24-byte last tensor
    bin_dir = llama_cpp_bin_dir()
    padded = tmp_path / "padded.gguf"
    subprocess.run([str(bin_dir / "llama-gguf-split"), "--merge", runtime["shards"]["first"], str(padded)],
                   check=True, capture_output=True, env=dict(os.environ, LD_LIBRARY_PATH=str(bin_dir)))
    port = free_port()
    env = dict(os.environ, OLLAMA_HOST=f"127.0.0.1:{port}", OLLAMA_MODELS=str(tmp_path / "by-hand"), HOME=str(tmp_path))
    server = subprocess.Popen([str(ollama), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (tmp_path / "Modelfile").write_text(f"FROM {padded}\n")
        for _ in range(100):
            if subprocess.run([str(ollama), "list"], env=env, capture_output=True).returncode == 0:
                break
        by_hand = subprocess.run([str(ollama), "create", "padded", "-f", str(tmp_path / "Modelfile")], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert by_hand.returncode == 1 and "Error: invalid file magic" in by_hand.stderr, by_hand.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert merge(runtime) == 0 and create(runtime) == 0
    merged = Path(runtime["merged"])
    assert merged.stat().st_size == padded.stat().st_size - 8
    assert merged.read_bytes() == padded.read_bytes()[:-8]
    digest = merged_digest(str(merged))
    blob = models / "ollama" / "blobs" / f"sha256-{digest}"
    assert blob.stat().st_ino == merged.stat().st_ino, "zero-copy: the blob is the merged file"
    env["OLLAMA_MODELS"] = str(models / "ollama")
    server = subprocess.Popen([str(ollama), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            if subprocess.run([str(ollama), "list"], env=env, capture_output=True).returncode == 0:
                break
        answer = httpx.post(f"{base}/api/generate", json={"model": "tiny", "prompt": "abc", "stream": False,
                                                           "options": {"num_predict": 6, "temperature": 0, "repeat_penalty": 1}},
                            timeout=120, trust_env=False).json()
        expected, _ = greedy(bin_dir, merged, "abc", 6)
        assert answer["response"] == expected, answer
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_num_gpu_auto_comes_from_the_environment_and_a_new_number_does_not_rewrite_the_model(
        tmp_path: Path, ollama_current: Path, capsys, monkeypatch) -> None:
    """The image says num_gpu: auto; the create step takes the number `up`
    planned (BUILDER_NUM_GPU). With ollama 0.30+, whose create rewrites every
    GGUF, another number (other GPUs) creates the model from itself: the
    model blob stays, only the parameters change. Dropping a parameter
    cannot be done that way (ollama merges parameters): then the shards are
    created again."""
    from builder.supervisor.common import StepError

    models = tmp_path / "models"
    runtime = dict(runtime_for(models, ollama_current), ollama_generation="0.30")
    runtime["create"] = {"parameters": {"num_gpu": "auto", "temperature": 0}, "template": "{{ .Prompt }}"}
    write_split_model(models / "tiny", "tiny", 3, seed=0)
    store = models / "ollama"
    manifest_file = store / "manifests/registry.ollama.ai/library/tiny/latest"

    def model_and_params() -> tuple[str, dict]:
        manifest = json.loads(manifest_file.read_text())
        model = next(l["digest"] for l in manifest["layers"] if l["mediaType"] == "application/vnd.ollama.image.model")
        params = next(l["digest"] for l in manifest["layers"] if l["mediaType"] == "application/vnd.ollama.image.params")
        return model, json.loads((store / "blobs" / params.replace(":", "-")).read_text())

    monkeypatch.delenv("BUILDER_NUM_GPU", raising=False)
    with pytest.raises(StepError, match=r"num_gpu is auto in this image and BUILDER_NUM_GPU is not set: `builder up` sets it"):
        create(runtime)
    monkeypatch.setenv("BUILDER_NUM_GPU", "14")
    assert create(runtime) == 0
    first_model, params = model_and_params()
    assert params == {"num_gpu": 14, "temperature": 0}
    capsys.readouterr()

    monkeypatch.setenv("BUILDER_NUM_GPU", "61")  # other GPUs: another plan
    assert create(runtime) == 0
    out = capsys.readouterr().out
    assert "only the create request changed; creating tiny:latest from itself" in out and "ollama rewrote" not in out
    model, params = model_and_params()
    assert model == first_model and params == {"num_gpu": 61, "temperature": 0}
    assert set(blobs(store)) == referenced_digests(str(store)), "the old parameters' blob is gone"

    runtime["create"]["parameters"] = {"num_gpu": "auto"}  # temperature dropped: from itself would keep it
    assert create(runtime) == 0
    out = capsys.readouterr().out
    assert "ollama rewrote the 3 shard(s) into one blob" in out
    assert ("create: the config no longer sets model.parameters.temperature; ollama keeps what the old tiny:latest set when "
            "it creates a model from itself, so tiny:latest is created from its shards again (ollama rewrites them all). "
            "Next time, keep it in the config with the value you want instead") in out, out
    assert model_and_params()[1] == {"num_gpu": 61}
