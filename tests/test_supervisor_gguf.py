"""The supervisor's own GGUF reader against files written by gguf-py."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from builder.supervisor.gguf import GGML_BLOCKS, GGUFError, check_file


def test_block_table_matches_gguf_py() -> None:
    sizes = gguf.constants.GGML_QUANT_SIZES
    theirs = {int(kind): value for kind, value in sizes.items()}
    assert {kind: theirs[kind] for kind in GGML_BLOCKS} == GGML_BLOCKS
    # Every type llama.cpp b4610 could write is known here.
    assert {kind for kind in theirs if kind < 39} <= set(GGML_BLOCKS)


def write_model(path: Path, split: int | None = None) -> list[Path]:
    kwargs = {"split_max_tensors": split} if split else {}
    writer = gguf.GGUFWriter(str(path), "llama", **kwargs)
    writer.add_block_count(2)
    writer.add_string("general.name", "tiny")
    for index in range(4):
        writer.add_tensor(f"blk.{index}.weight", np.full((7, 13), index, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(path.parent.glob(path.stem + "*.gguf"))


def test_whole_file_checks(tmp_path: Path) -> None:
    (path,) = write_model(tmp_path / "m.gguf")
    header = check_file(str(path), path.stat().st_size)
    assert header.tensor_count == 4 and header.metadata["general.architecture"] == "llama"
    assert header.expected_size <= path.stat().st_size < header.expected_size + 32


def test_split_keys_and_truncation(tmp_path: Path) -> None:
    shards = write_model(tmp_path / "m.gguf", split=2)
    assert [p.name for p in shards] == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    second = check_file(str(shards[1]), shards[1].stat().st_size)
    assert (second.split_no, second.split_count) == (1, 2)
    with pytest.raises(GGUFError, match="truncated"):
        check_file(str(shards[1]), shards[1].stat().st_size - 100)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:40])
    with pytest.raises(GGUFError, match="ends inside its header"):
        check_file(str(shards[1]), 40)
    shards[0].write_bytes(b"NOPE" + data[4:])
    with pytest.raises(GGUFError, match="bad magic"):
        check_file(str(shards[0]), len(data))


def test_crafted_headers_fail_cleanly(tmp_path: Path) -> None:
    import struct

    (path,) = write_model(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    # An absurd key count, then an absurd string length: GGUFError, never a crash.
    for offset, value in ((16, 2**62), (24, 2**62)):
        bad = bytearray(data)
        struct.pack_into("<Q", bad, offset, value)
        target = tmp_path / f"bad-{offset}.gguf"
        target.write_bytes(bytes(bad))
        with pytest.raises(GGUFError):
            check_file(str(target), len(bad))
