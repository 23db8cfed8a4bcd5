"""Read the shared libraries an ELF file asks for (DT_NEEDED), nothing more.

Enough of ELF64 little-endian (x86-64, aarch64) to stage only the libraries
a llama.cpp binary loads.
"""

from __future__ import annotations

import struct

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5


def elf_needed(data: bytes) -> list[str] | None:
    """DT_NEEDED names of an ELF64 LE file, or None when `data` is not one."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for index in range(phnum):
        base = phoff + index * phentsize
        if base + 56 > len(data):
            return None
        p_type, = struct.unpack_from("<I", data, base)
        p_offset, p_vaddr = struct.unpack_from("<QQ", data, base + 8)
        p_filesz, = struct.unpack_from("<Q", data, base + 32)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []  # statically linked
    needed: list[int] = []
    strtab_vaddr = None
    offset, size = dynamic
    for entry in range(offset, min(offset + size, len(data)) - 15, 16):
        tag, value = struct.unpack_from("<qQ", data, entry)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed.append(value)
        elif tag == DT_STRTAB:
            strtab_vaddr = value
    if strtab_vaddr is None:
        return []
    strtab = next((off + strtab_vaddr - vaddr for vaddr, off, filesz in loads if vaddr <= strtab_vaddr < vaddr + filesz), None)
    if strtab is None:
        return None
    names = []
    for name_offset in needed:
        start = strtab + name_offset
        end = data.find(b"\0", start)
        names.append(data[start:end].decode("utf-8", "replace"))
    return names
