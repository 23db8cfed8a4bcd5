"""Join split GGUF shards into one file, hashing the bytes as they are written.

The output is byte for byte what llama.cpp b4610's `llama-gguf-split --merge`
writes (the tests compare the two), so the merged file is the same whichever
tool made it; but each byte is read once and written once, and its sha256 is
known at the end without reading the file again: `create` then hands ollama
the file by hard link instead of a copy.

What gguf-split does, and so what this does: shard 1's metadata, in order,
except that `split.count` is set to 0 and so moves to the end; every tensor
of every shard in order, its offset the previous one's plus its size padded
to the file's alignment, its dimensions without trailing 1s; the metadata
padded to the alignment; then each tensor's data padded with zeros to 32
bytes (GGUF_DEFAULT_ALIGNMENT).
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import BinaryIO, Callable

from .gguf import DEFAULT_ALIGNMENT, MAGIC, GGUFHeader

CHUNK = 8 << 20
GGUF_TYPE_UINT16 = 2


def _pad(size: int, alignment: int) -> int:
    return (size + alignment - 1) // alignment * alignment


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def merged_metadata(first_raw: bytes, headers: list[GGUFHeader]) -> bytes:
    """The merged file's header, key-value pairs and tensor table, padded."""
    first = headers[0]
    alignment = first.alignment
    kvs = []
    split_count = None
    for key, start, end in first.kv_spans:
        if key == "split.count":
            split_count = _string(key) + struct.pack("<IH", GGUF_TYPE_UINT16, 0)
        else:
            kvs.append(first_raw[start:end])
    if split_count is not None:
        kvs.append(split_count)
    tensors = [t for header in headers for t in header.tensors]
    table = []
    offset = 0
    for tensor in tensors:
        dims = list(tensor.shape)
        while len(dims) > 1 and dims[-1] == 1:  # ggml_n_dims
            dims.pop()
        table.append(
            _string(tensor.name)
            + struct.pack("<I", len(dims))
            + b"".join(struct.pack("<q", d) for d in dims)
            + struct.pack("<iQ", tensor.ggml_type, offset)
        )
        offset += _pad(tensor.nbytes, alignment)
    head = MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    meta = head + b"".join(kvs) + b"".join(table)
    return meta + b"\0" * (_pad(len(meta), alignment) - len(meta))


def join(shards: list[str], headers: list[GGUFHeader], out: BinaryIO, progress: Callable[[int], None]) -> tuple[str, int]:
    """Write the merged file to `out`; return its sha256 and size."""
    with open(shards[0], "rb") as handle:
        first_raw = handle.read(headers[0].data_offset)
    meta = merged_metadata(first_raw, headers)
    digest = hashlib.sha256()
    written = 0

    def emit(data) -> None:
        nonlocal written
        out.write(data)
        digest.update(data)
        written += len(data)

    emit(meta)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    for path, header in zip(shards, headers):
        with open(path, "rb", buffering=0) as source:
            for tensor in header.tensors:
                source.seek(header.data_offset + tensor.offset)
                left = tensor.nbytes
                while left:
                    count = source.readinto(view[: min(CHUNK, left)])
                    if not count:
                        raise ValueError(f"{path} ends inside tensor {tensor.name}")
                    emit(view[:count])
                    left -= count
                emit(b"\0" * (_pad(tensor.nbytes, DEFAULT_ALIGNMENT) - tensor.nbytes))
                progress(written)
    return digest.hexdigest(), written
