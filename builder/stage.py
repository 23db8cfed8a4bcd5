"""Unpack the release archives into the build context, safely and byte-stably.

ollama's archive gives `bin/` and `lib/ollama/`; llama.cpp's zip gives
`build/bin/`, of which only the chosen programs and the libraries they load
are kept. Absolute paths, `..` and links that leave the tree are refused.
Every mtime is set to SOURCE_DATE_EPOCH and modes to 0755/0644, so the same
archives always give the same tree (and the same image layers).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from builder.elf import elf_needed
from builder.errors import BuilderError
from builder.fsutil import write_atomic
from builder.plan import STAGED_LLAMA_CPP, STAGED_OLLAMA

LLAMA_CPP_INNER = "llama.cpp/"  # staged/llama.cpp/llama.cpp/build/bin -> /opt/llama.cpp/build/bin

OLLAMA_KEEP = ("bin/", "lib/ollama/")


class UnsafeArchive(BuilderError):
    """An archive member would land outside the staged tree."""


@dataclass(frozen=True)
class Member:
    path: str  # normalized, relative
    kind: str  # "file" | "dir" | "link"
    data: bytes = b""
    target: str = ""  # link target, as written in the archive
    executable: bool = False


def _normalize(name: str, archive: str) -> str:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"{archive}: member '{name}' is an absolute path; refusing to stage it")
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if ".." in parts:
        raise UnsafeArchive(f"{archive}: member '{name}' climbs out with '..'; refusing to stage it")
    return "/".join(parts)


def _check_link(member_path: str, target: str, archive: str) -> None:
    if target.startswith("/"):
        raise UnsafeArchive(f"{archive}: link '{member_path}' points to the absolute path '{target}'; refusing to stage it")
    depth = len(PurePosixPath(member_path).parent.parts)
    for part in PurePosixPath(target).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise UnsafeArchive(f"{archive}: link '{member_path}' -> '{target}' leaves the archive; refusing to stage it")


def read_tar(path: Path) -> list[Member]:
    """Every member of a (compressed) tar, checked for safety."""
    name = path.name
    members = []
    try:
        with tarfile.open(path) as archive:
            for info in archive:
                rel = _normalize(info.name, name)
                if not rel:
                    continue
                if info.isdir():
                    members.append(Member(rel, "dir"))
                elif info.issym():
                    _check_link(rel, info.linkname, name)
                    members.append(Member(rel, "link", target=info.linkname))
                elif info.islnk():
                    source = _normalize(info.linkname, name)
                    data = next((m.data for m in members if m.path == source and m.kind == "file"), None)
                    if data is None:
                        raise UnsafeArchive(f"{name}: hard link '{rel}' -> '{info.linkname}' has no target in the archive")
                    members.append(Member(rel, "file", data=data, executable=bool(info.mode & 0o111)))
                elif info.isfile():
                    handle = archive.extractfile(info)
                    assert handle is not None
                    members.append(Member(rel, "file", data=handle.read(), executable=bool(info.mode & 0o111)))
                else:
                    raise UnsafeArchive(f"{name}: member '{info.name}' is a device or fifo; refusing to stage it")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BuilderError(f"{name}: not a readable tar archive ({exc}); delete it from the cache and fetch again") from None
    return members


def read_zip(path: Path) -> list[Member]:
    """Every member of a zip, checked for safety (zip symlinks included)."""
    name = path.name
    members = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                rel = _normalize(info.filename, name)
                if not rel:
                    continue
                mode = info.external_attr >> 16
                if info.is_dir():
                    members.append(Member(rel, "dir"))
                elif stat.S_ISLNK(mode):
                    target = archive.read(info).decode()
                    _check_link(rel, target, name)
                    members.append(Member(rel, "link", target=target))
                else:
                    members.append(Member(rel, "file", data=archive.read(info), executable=bool(mode & 0o111)))
    except (zipfile.BadZipFile, OSError) as exc:
        raise BuilderError(f"{name}: not a readable zip archive ({exc}); delete it from the cache and fetch again") from None
    return members


def select_ollama(members: list[Member]) -> list[Member]:
    """bin/ and lib/ollama/ of ollama's archive."""
    kept = [m for m in members if any((m.path + "/").startswith(k) for k in OLLAMA_KEEP) or m.path == "lib"]
    if not any(m.path == "bin/ollama" and m.kind == "file" for m in kept):
        raise BuilderError("the ollama archive has no bin/ollama; is ollama.url the linux-amd64 .tgz?")
    return kept


def select_llama_cpp(members: list[Member], binaries: tuple[str, ...]) -> list[Member]:
    """The chosen programs of build/bin/ and the libraries they load, by DT_NEEDED."""
    prefix = "build/bin/"
    by_name = {m.path[len(prefix):]: m for m in members if m.path.startswith(prefix) and "/" not in m.path[len(prefix):]}
    missing = [b for b in binaries if b not in by_name]
    if missing:
        available = sorted(n for n, m in by_name.items() if n.startswith("llama-") and m.kind == "file")
        raise BuilderError(
            f"the llama.cpp archive has no build/bin/{missing[0]} (llama_cpp.binaries); it has: {', '.join(available[:12])}"
        )
    wanted: list[str] = []
    queue = list(binaries)
    while queue:
        current = queue.pop(0)
        if current in wanted or current not in by_name:
            continue  # not in the archive: a system library (libc, libgomp)
        wanted.append(current)
        member = by_name[current]
        if member.kind == "link":
            queue.append(PurePosixPath(member.target).name)
        else:
            queue.extend(elf_needed(member.data) or [])
    return [Member(LLAMA_CPP_INNER + m.path, m.kind, m.data, m.target, m.executable) for m in (by_name[n] for n in sorted(wanted))]


def _write_tree(members: list[Member], root: Path, epoch: int) -> None:
    dirs = {root}
    for member in members:
        rel = member.path
        target = root / rel
        for parent in list(target.parents)[: len(PurePosixPath(rel).parts) - 1]:
            dirs.add(parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        if member.kind == "dir":
            target.mkdir(exist_ok=True)
            dirs.add(target)
        elif member.kind == "link":
            target.unlink(missing_ok=True)
            os.symlink(member.target, target)
            os.utime(target, (epoch, epoch), follow_symlinks=False)
        else:
            target.unlink(missing_ok=True)
            target.write_bytes(member.data)
            os.chmod(target, 0o755 if member.executable else 0o644)
            os.utime(target, (epoch, epoch))
    for directory in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        os.chmod(directory, 0o755)
        os.utime(directory, (epoch, epoch))


def _replace_tree(context: Path, relative: str, members: list[Member], epoch: int) -> None:
    """Write the tree beside its final place, then swap it in."""
    final = context / relative
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        _write_tree(members, scratch, epoch)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(scratch, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        # The top of a staged tree is a COPY source: its mtime counts too.
        os.utime(final, (epoch, epoch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stage(context: Path, ollama_archive: Path, ollama_sha: str, llama_archive: Path, llama_sha: str,
          binaries: tuple[str, ...], epoch: int) -> list[str]:
    """Stage both trees unless their stamps say they are already there; return what was (re)staged."""
    done = []
    jobs = (
        ("ollama", STAGED_OLLAMA, ollama_sha, (), lambda: select_ollama(read_tar(ollama_archive))),
        ("llama.cpp", STAGED_LLAMA_CPP, llama_sha, binaries, lambda: select_llama_cpp(read_zip(llama_archive), binaries)),
    )
    for label, relative, digest, selection, members in jobs:
        stamp_file = context / f"{relative}.stamp"
        stamp = hashlib.sha256(f"{digest}\n{','.join(selection)}\n{epoch}\n".encode()).hexdigest() + "\n"
        if (context / relative).is_dir() and stamp_file.is_file() and stamp_file.read_text() == stamp:
            continue
        stamp_file.unlink(missing_ok=True)
        _replace_tree(context, relative, members(), epoch)
        write_atomic(stamp_file, stamp.encode(), mtime=epoch)
        done.append(label)
    if (context / "staged").is_dir():
        os.utime(context / "staged", (epoch, epoch))
    return done
