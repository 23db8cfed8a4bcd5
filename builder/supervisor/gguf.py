"""Just enough of the GGUF format to check a shard before merging it.

Standard library only (this runs inside the image). Reads the header, the
metadata and the tensor table, never the tensor data, and works out how long
the file must be: b4610's llama-gguf-split accepts a truncated shard and
writes a corrupt model with exit status 0, so the length check is ours.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type -> (block size in elements, bytes per block), as ggml.c defines them.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1 (as gguf-py sizes it; never stored in model files)
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4 (newer than b4610)
    40: (64, 36),  # NVFP4 (newer than b4610)
    41: (128, 18),  # Q1_0 (newer than b4610)
}

# Metadata value types (gguf.h): fixed-size scalars by struct code.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a well-formed GGUF file (or not a whole one)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensor_count: int
    data_offset: int
    data_size: int  # bytes the tensor data needs, from the tensor table
    tensors: tuple[TensorInfo, ...] = ()
    kv_spans: tuple[tuple[str, int, int], ...] = ()  # (key, start, end) of each entry, in file order

    @property
    def alignment(self) -> int:
        return self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)

    @property
    def expected_size(self) -> int:
        return self.data_offset + self.data_size

    @property
    def split_no(self) -> int | None:
        return self.metadata.get("split.no")

    @property
    def split_count(self) -> int | None:
        return self.metadata.get("split.count")


class _Reader:
    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.offset = 0
        try:
            self.size = os.fstat(handle.fileno()).st_size
        except (AttributeError, OSError, ValueError):
            self.size = 1 << 62

    def take(self, count: int) -> bytes:
        if count < 0 or count > self.size - self.offset:
            raise GGUFError(f"ends inside its header (needs {count} bytes at byte {self.offset} of {self.size})")
        data = self.handle.read(count)
        if len(data) != count:
            raise GGUFError(f"ends inside its header (at byte {self.offset + len(data)})")
        self.offset += count
        return data

    def skip(self, count: int) -> None:
        if count < 0 or count > self.size - self.offset:
            raise GGUFError(f"ends inside its header (needs {count} bytes at byte {self.offset} of {self.size})")
        self.handle.seek(count, os.SEEK_CUR)
        self.offset += count

    def unpack(self, code: str) -> Any:
        size = struct.calcsize("<" + code)
        return struct.unpack("<" + code, self.take(size))[0]

    def string(self) -> str:
        length = self.unpack("Q")
        if length > 1 << 24:
            raise GGUFError(f"has an implausible string length {length} at byte {self.offset}")
        return self.take(length).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind = self.unpack("I")
            count = self.unpack("Q")
            if item_kind in _SCALARS:
                size = struct.calcsize("<" + _SCALARS[item_kind])
                self.skip(size * count)  # token tables are large: skip, do not decode
                return count
            if count > (self.size - self.offset) // 8:  # every item needs at least 8 bytes
                raise GGUFError(f"has an implausible array of {count} items at byte {self.offset}")
            return [self.value(item_kind) for _ in range(count)]
        raise GGUFError(f"has an unknown metadata type {kind} at byte {self.offset}")


def read_header(handle: BinaryIO) -> GGUFHeader:
    """Parse the header, metadata and tensor table of an open GGUF file."""
    reader = _Reader(handle)
    if reader.take(4) != MAGIC:
        raise GGUFError("is not a GGUF file (bad magic)")
    version = reader.unpack("I")
    if version not in (2, 3):
        raise GGUFError(f"has GGUF version {version}, expected 2 or 3")
    tensor_count = reader.unpack("Q")
    kv_count = reader.unpack("Q")
    if kv_count > reader.size // 12 or tensor_count > reader.size // 24:
        raise GGUFError(f"ends inside its header ({kv_count} keys and {tensor_count} tensors cannot fit in {reader.size} bytes)")
    metadata: dict[str, Any] = {}
    spans = []
    for _ in range(kv_count):
        start = reader.offset
        key = reader.string()
        metadata[key] = reader.value(reader.unpack("I"))
        spans.append((key, start, reader.offset))
    data_size = 0
    tensors = []
    for _ in range(tensor_count):
        name = reader.string()
        dims = reader.unpack("I")
        if dims > 8:
            raise GGUFError(f"tensor {name} has {dims} dimensions (at most 4 are possible)")
        shape = [reader.unpack("Q") for _ in range(dims)]
        kind = reader.unpack("I")
        offset = reader.unpack("Q")
        if kind not in GGML_BLOCKS:
            raise GGUFError(f"tensor {name} has an unknown ggml type {kind}")
        block, block_bytes = GGML_BLOCKS[kind]
        elements = 1
        for dim in shape:
            elements *= dim
        nbytes = elements // block * block_bytes
        tensors.append(TensorInfo(name, kind, tuple(shape), offset, nbytes))
        data_size = max(data_size, offset + nbytes)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise GGUFError(f"has an invalid general.alignment {alignment!r}")
    data_offset = (reader.offset + alignment - 1) // alignment * alignment
    return GGUFHeader(version, metadata, tensor_count, data_offset, data_size, tuple(tensors), tuple(spans))


def read_header_file(path: str) -> GGUFHeader:
    """Parse the header of the GGUF file at `path` (the tensor data is never read)."""
    with open(path, "rb") as handle:
        return read_header(handle)


def check_file(path: str, size: int) -> GGUFHeader:
    """Parse `path` and check it is as long as its own header says."""
    with open(path, "rb") as handle:
        header = read_header(handle)
    if size < header.expected_size:
        raise GGUFError(f"is truncated: {size} bytes, its header needs {header.expected_size}")
    return header
