"""Join split GGUF shards into one file, hashing the bytes as they are written.

The output is byte for byte what llama.cpp b4610's `llama-gguf-split --merge`
writes up to the end of the last tensor (the tests compare the two), so the
merged file is the same whichever tool made it; but each byte is read once
and written once, and its sha256 is known at the end without reading the
file again: `create` then hands ollama the file by hard link instead of a
copy.

The one difference: gguf-split pads the last tensor too, and ollama 0.5.7's
create cannot take a file with bytes after its last tensor (ggufLayers
copies the decoded part, then reads the padding as the next file's magic:
"invalid file magic"; seen with a real 0.5.7). So the join stops at the last
tensor's end, and the merge step cuts gguf-split's padding off its output.

What gguf-split does, and so what this does: shard 1's metadata, in order,
except that `split.count` is set to 0 and so moves to the end; every tensor
of every shard in order, its offset the previous one's plus its size padded
to the file's alignment, its dimensions without trailing 1s; the metadata
padded to the alignment; then each tensor's data padded with zeros to 32
bytes (GGUF_DEFAULT_ALIGNMENT), but for the last.
"""

from __future__ import annotations

import hashlib
import queue
import struct
import threading
from typing import BinaryIO, Callable

from .gguf import DEFAULT_ALIGNMENT, MAGIC, GGUFHeader

CHUNK = 16 << 20
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


class _Hasher:
    """sha256 on a second thread (hashlib lets go of the GIL), so hashing
    overlaps the copy instead of adding to it. Buffers go round a small pool."""

    def __init__(self, buffers: int = 4, size: int = CHUNK):
        self.digest = hashlib.sha256()
        self.free: queue.Queue = queue.Queue()
        self.todo: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self.free.put(bytearray(size))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            buffer, count = item
            try:
                self.digest.update(memoryview(buffer)[:count])
            except BaseException as exc:  # pragma: no cover - hashlib does not fail on bytes
                self.error = exc
            self.free.put(buffer)

    def take(self) -> bytearray:
        return self.free.get()

    def give(self, buffer: bytearray, count: int) -> None:
        self.todo.put((buffer, count))

    def finish(self) -> str:
        self.todo.put(None)
        self.thread.join()
        if self.error:
            raise self.error
        return self.digest.hexdigest()


def join(shards: list[str], headers: list[GGUFHeader], out: BinaryIO, progress: Callable[[int], None]) -> tuple[str, int]:
    """Write the merged file to `out`; return its sha256 and size."""
    with open(shards[0], "rb") as handle:
        first_raw = handle.read(headers[0].data_offset)
    hasher = _Hasher()
    written = 0

    def emit_bytes(data: bytes) -> None:
        nonlocal written
        if not data:
            return
        buffer = hasher.take()
        buffer[: len(data)] = data
        out.write(data)
        hasher.give(buffer, len(data))
        written += len(data)

    try:
        emit_bytes(merged_metadata(first_raw, headers))
        last = (len(shards) - 1, len(headers[-1].tensors) - 1)
        for number, (path, header) in enumerate(zip(shards, headers)):
            with open(path, "rb", buffering=0) as source:
                for index, tensor in enumerate(header.tensors):
                    source.seek(header.data_offset + tensor.offset)
                    left = tensor.nbytes
                    while left:
                        buffer = hasher.take()
                        view = memoryview(buffer)
                        count = source.readinto(view[: min(len(buffer), left)])
                        if not count:
                            hasher.free.put(buffer)
                            raise ValueError(f"{path} ends inside tensor {tensor.name}")
                        out.write(view[:count])
                        view.release()
                        hasher.give(buffer, count)
                        written += count
                        left -= count
                    if (number, index) != last:  # nothing after the last tensor: see the module's docstring
                        emit_bytes(b"\0" * (_pad(tensor.nbytes, DEFAULT_ALIGNMENT) - tensor.nbytes))
                    progress(written)
    finally:
        digest = hasher.finish()
    return digest, written
