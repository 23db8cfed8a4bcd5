"""The supervisor's merge role on the host, with the real llama-gguf-split
(compiled from llama.cpp's source by the fixture) and shards written by gguf-py."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import gguf
import pytest

from builder.supervisor.common import StepError
from builder.supervisor.merge import merge, record_path
from tests.fixtures.llama_cpp_release import llama_cpp_release_zip
from builder.sample import write_split_model
from tests.helpers import tree_snapshot


@pytest.fixture(scope="session")
def gguf_split(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("llama")
    with zipfile.ZipFile(llama_cpp_release_zip()) as archive:
        archive.extractall(folder)
    binary = folder / "build" / "bin" / "llama-gguf-split"
    binary.chmod(0o755)
    os.environ["LD_LIBRARY_PATH"] = str(binary.parent)  # as the image's ENV does
    return str(binary)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    write_split_model(tmp_path / "tiny", "tiny", 3)
    return tmp_path


def runtime_for(models: Path, gguf_split: str, count: int = 3) -> dict:
    return {
        "shards": {"first": str(models / "tiny" / f"tiny-00001-of-{count:05d}.gguf"), "count": count, "prefix": "tiny"},
        "merged": str(models / "tiny" / "tiny.gguf"),
        "gguf_split": gguf_split,
    }


def test_merge_refuses_a_model_ollama_cannot_load_before_writing(models: Path, gguf_split: str) -> None:
    from tests.fixtures.gguf_edit import edit_metadata

    edit_metadata(models / "tiny" / "tiny-00001-of-00003.gguf", drop=("tokenizer.ggml.tokens",))
    before = tree_snapshot(models)
    with pytest.raises(StepError, match=r"^merge: .*/tiny-00001-of-00003.gguf: tokenizer.ggml.tokens is missing: the model has no tokenizer"):
        merge(runtime_for(models, gguf_split))
    assert tree_snapshot(models) == before
    assert sorted(p.name for p in (models / "tiny").iterdir()) == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


def test_merge_joins_verifies_and_records(models: Path, gguf_split: str, capsys) -> None:
    runtime = runtime_for(models, gguf_split)
    assert merge(runtime) == 0
    merged = Path(runtime["merged"])
    reader = gguf.GGUFReader(merged)
    assert len(reader.tensors) == 21
    assert Path(record_path(runtime["merged"])).is_file()
    assert [p.name for p in (models / "tiny").iterdir() if p.name.startswith(".")] == [".tiny.gguf.lock"]
    # Nothing changed: the second run only reads its record (how fast that is
    # is a benchmark figure): the merged file is the same inode, untouched.
    before = merged.stat()
    capsys.readouterr()
    assert merge(runtime) == 0
    out = capsys.readouterr().out
    assert "is up to date" in out and "joining" not in out and "hashing" not in out
    after = merged.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_changed_shard_merges_again(models: Path, gguf_split: str, capsys) -> None:
    import hashlib
    import json
    import subprocess

    runtime = runtime_for(models, gguf_split)
    assert merge(runtime) == 0
    old = hashlib.sha256(Path(runtime["merged"]).read_bytes()).hexdigest()
    write_split_model(models / "tiny", "tiny", 3, seed=1)  # same names, new bytes
    capsys.readouterr()
    assert merge(runtime) == 0
    assert "joining 3 shards" in capsys.readouterr().out
    # The oracle: llama-gguf-split's own merge of the new shards.
    oracle = models / "oracle.gguf"
    subprocess.run([gguf_split, "--merge", runtime["shards"]["first"], str(oracle)], check=True, capture_output=True)
    expected = hashlib.sha256(oracle.read_bytes()).hexdigest()  # this model's last tensor needs no padding
    assert expected != old
    assert hashlib.sha256(Path(runtime["merged"]).read_bytes()).hexdigest() == expected
    assert json.loads(Path(record_path(runtime["merged"])).read_text())["sha256"] == expected


@pytest.mark.parametrize("damage", ["missing", "truncated", "other-model", "bad-magic"])
def test_bad_shard_stops_before_anything_is_written(models: Path, gguf_split: str, damage: str) -> None:
    folder = models / "tiny"
    second = folder / "tiny-00002-of-00003.gguf"
    if damage == "missing":
        second.unlink()
    elif damage == "truncated":
        data = second.read_bytes()
        second.write_bytes(data[: len(data) - 4096])
    elif damage == "other-model":
        other = write_split_model(models / "other", "tiny", 3, blocks=5)
        second.write_bytes(other[1].read_bytes())
    else:
        data = second.read_bytes()
        second.write_bytes(b"GGUX" + data[4:])
    before = tree_snapshot(folder)
    with pytest.raises(StepError) as error:
        merge(runtime_for(models, gguf_split))
    message = str(error.value)
    expected = {
        "missing": f"merge: shard {second} is missing",
        "truncated": f"merge: shard {second} is truncated",
        "other-model": "a shard belongs to another model",
        "bad-magic": f"merge: shard {second} is not a GGUF file (bad magic)",
    }[damage]
    assert expected in message
    assert tree_snapshot(folder) == before, "a failed check must not touch the user's files"


def test_shard_from_another_split(models: Path, gguf_split: str) -> None:
    other = write_split_model(models / "four", "tiny", 4)
    target = models / "tiny" / "tiny-00003-of-00003.gguf"
    target.write_bytes(other[2].read_bytes())
    with pytest.raises(StepError, match=r"says it is part 3 of 4, expected part 3 of 3; it belongs to another split model"):
        merge(runtime_for(models, gguf_split))


def test_leftovers_and_broken_merged_file_are_replaced(models: Path, gguf_split: str, capsys) -> None:
    runtime = runtime_for(models, gguf_split)
    folder = models / "tiny"
    # What a killed run leaves: our temporary file, and (from a hand-run
    # llama-gguf-split) a 0-byte file under the final name.
    (folder / ".tiny.gguf.merging-12345").write_bytes(b"GGUF partial")
    (folder / "tiny.gguf").write_bytes(b"")
    assert merge(runtime) == 0
    out = capsys.readouterr().out
    assert "removed .tiny.gguf.merging-12345" in out
    assert "merging again" in out
    assert len(gguf.GGUFReader(runtime["merged"]).tensors) == 21
    assert not (folder / ".tiny.gguf.merging-12345").exists()


def test_failed_tool_leaves_no_output(models: Path, tmp_path: Path, capsys) -> None:
    fake = tmp_path / "fake-split"
    fake.write_text('#!/bin/sh\nhead -c 1000 /dev/zero > "$3"\necho "gguf_merge: failed to load input GGUF" >&2\nexit 1\n')
    fake.chmod(0o755)
    runtime = dict(runtime_for(models, str(fake)), merge_tool="llama-gguf-split")
    with pytest.raises(StepError, match=r"llama-gguf-split failed \(exit 1\): gguf_merge: failed to load input GGUF"):
        merge(runtime)
    assert sorted(p.name for p in (models / "tiny").iterdir()) == [".tiny.gguf.lock"] + [f"tiny-0000{n}-of-00003.gguf" for n in (1, 2, 3)]


def test_hand_merged_file_is_adopted_not_merged_again(models: Path, gguf_split: str, capsys) -> None:
    import subprocess

    runtime = runtime_for(models, gguf_split)
    subprocess.run([gguf_split, "--merge", runtime["shards"]["first"], runtime["merged"]], check=True, capture_output=True)
    before = Path(runtime["merged"]).stat().st_mtime_ns
    assert merge(runtime) == 0
    assert "already holds all 21 tensors; recorded it" in capsys.readouterr().out
    assert Path(runtime["merged"]).stat().st_mtime_ns == before


@pytest.mark.parametrize("shards,padded", [(2, False), (3, False), (5, False), (3, True)])
def test_builder_join_writes_what_llama_gguf_split_writes(tmp_path: Path, gguf_split: str, shards: int, padded: bool) -> None:
    """The real tool is the oracle: both merges give the same bytes up to the
    last tensor's end, and the recorded sha256 is the file's. With a last
    tensor of 24 bytes, llama-gguf-split pads 8 zeros after it, which ollama
    0.5.7's create refuses: both merges end at the tensor."""
    import hashlib
    import json

    from builder.supervisor.gguf import read_header_file

    oracle = tmp_path / "oracle"
    write_split_model(oracle, "tiny", shards, blocks=4, width=48, rope_freqs=padded)
    subprocess.run([gguf_split, "--merge", str(oracle / f"tiny-00001-of-{shards:05d}.gguf"), str(oracle / "whole.gguf")],
                   check=True, capture_output=True)
    whole = (oracle / "whole.gguf").read_bytes()
    end = read_header_file(str(oracle / "whole.gguf")).expected_size
    assert len(whole) - end == (8 if padded else 0) and not whole[end:].strip(b"\0")
    outputs = {}
    for tool in ("builder", "llama-gguf-split"):
        root = tmp_path / tool
        write_split_model(root / "tiny", "tiny", shards, blocks=4, width=48, rope_freqs=padded)
        runtime = {
            "shards": {"first": str(root / "tiny" / f"tiny-00001-of-{shards:05d}.gguf"), "count": shards, "prefix": "tiny"},
            "merged": str(root / "tiny" / "tiny.gguf"),
            "gguf_split": gguf_split,
            "merge_tool": tool,
        }
        assert merge(runtime) == 0
        data = Path(runtime["merged"]).read_bytes()
        record = json.loads(Path(record_path(runtime["merged"])).read_text())
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        outputs[tool] = data
    assert outputs["builder"] == outputs["llama-gguf-split"] == whole[:end]


def test_builder_join_reads_and_writes_each_byte_once(models: Path, gguf_split: str, capsys) -> None:
    runtime = runtime_for(models, gguf_split)
    merge(runtime)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "merge: io read" in l)
    read, written = int(line.split()[4]), int(line.split()[6])
    size = Path(runtime["merged"]).stat().st_size
    shards = sum(p.stat().st_size for p in (models / "tiny").glob("tiny-*"))
    assert size <= written <= size * 1.01 + 4096, "the merged file is written once"
    assert shards - 65536 <= read <= shards * 1.01 + 65536, "each shard is read once (plus headers)"
