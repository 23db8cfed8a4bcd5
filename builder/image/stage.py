"""Unpack the release archives into the build context, safely and byte-stably.

ollama's archive (.tgz for 0.5.x, .tar.zst from 0.30) gives `bin/` and
`lib/ollama/`; llama.cpp's zip gives
`build/bin/`, of which only the chosen programs and the libraries they load
are kept. Absolute paths, `..`, links that leave the tree and members that
would be written through a link are refused. Members are streamed to disk
(ollama's archive unpacks to gigabytes). Every mtime is set to
SOURCE_DATE_EPOCH and modes to 0755/0644, so the same archives always give
the same tree, and the same image layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from builder.image.elf import elf_needed
from builder.errors import BuilderError
from builder.fsutil import write_atomic
from builder.render.blueprint import STAGED_LLAMA_CPP, STAGED_OLLAMA

OLLAMA_KEEP = ("bin/", "lib/ollama/")
LLAMA_CPP_INNER = "llama.cpp/"  # staged/llama.cpp/llama.cpp/build/bin -> /opt/llama.cpp/build/bin
LLAMA_BIN = "build/bin/"


class UnsafeArchive(BuilderError):
    """An archive member would land outside the staged tree."""


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


class TreeWriter:
    """Writes archive members under `root`, never through a link."""

    def __init__(self, root: Path, archive: str):
        self.root = root
        self.archive = archive
        self.kinds: dict[str, str] = {"": "dir"}
        self.executables: set[str] = set()

    def _parents(self, rel: str) -> None:
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            kind = self.kinds.get(parent)
            if kind == "link":
                raise UnsafeArchive(f"{self.archive}: member '{rel}' would be written through the link '{parent}'; refusing to stage it")
            if kind == "file":
                raise UnsafeArchive(f"{self.archive}: member '{rel}' is under the file '{parent}'; refusing to stage it")
            if kind is None:
                (self.root / parent).mkdir()
                self.kinds[parent] = "dir"

    def _claim(self, rel: str, kind: str) -> Path:
        self._parents(rel)
        existing = self.kinds.get(rel)
        if existing is not None and not (existing == kind == "dir") and not (existing == kind == "file"):
            raise UnsafeArchive(f"{self.archive}: member '{rel}' appears twice, as a {existing} and a {kind}; refusing to stage it")
        self.kinds[rel] = kind
        return self.root / rel

    def directory(self, rel: str) -> None:
        path = self._claim(rel, "dir")
        path.mkdir(exist_ok=True)

    def file(self, rel: str, source: BinaryIO, executable: bool) -> None:
        path = self._claim(rel, "file")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as handle:
            shutil.copyfileobj(source, handle, 1 << 20)
        (self.executables.add if executable else self.executables.discard)(rel)

    def link(self, rel: str, target: str) -> None:
        _check_link(rel, target, self.archive)
        path = self._claim(rel, "link")
        os.symlink(target, path)

    def copy(self, rel: str, source_rel: str) -> None:
        """A hard link in a tar: a copy of a file written before it."""
        if self.kinds.get(source_rel) != "file":
            raise UnsafeArchive(f"{self.archive}: hard link '{rel}' -> '{source_rel}' has no file to point to; refusing to stage it")
        with open(self.root / source_rel, "rb") as source:
            self.file(rel, source, source_rel in self.executables)

    def finish(self, epoch: int) -> None:
        """Fixed modes and mtimes everywhere, deepest first."""
        for rel in sorted(self.kinds, key=lambda r: (-r.count("/"), r), reverse=False):
            path = self.root / rel if rel else self.root
            kind = self.kinds[rel]
            if kind == "link":
                os.utime(path, (epoch, epoch), follow_symlinks=False)
                continue
            os.chmod(path, 0o755 if kind == "dir" or rel in self.executables else 0o644)
            os.utime(path, (epoch, epoch))


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@contextlib.contextmanager
def open_tar_stream(archive: Path) -> Iterator[tarfile.TarFile]:
    """A streaming reader of a .tar.zst (by its magic, whatever its name) or
    of a tar gzip, bzip2 or xz compress. Nothing is unpacked to a temporary file."""
    with open(archive, "rb") as raw:
        if raw.read(4) == ZSTD_MAGIC:
            import zstandard

            raw.seek(0)
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False) as plain:
                with tarfile.open(fileobj=plain, mode="r|") as tar:
                    yield tar
            return
        raw.seek(0)
        with tarfile.open(fileobj=raw, mode="r|*") as tar:
            yield tar


def _archive_errors() -> tuple[type[Exception], ...]:
    import zlib

    errors: tuple[type[Exception], ...] = (tarfile.TarError, EOFError, zlib.error)
    try:
        import zstandard
    except ImportError:  # a missing module must not hide a .tgz's own error
        return errors
    return errors + (zstandard.ZstdError,)


def write_ollama(archive: Path, writer: TreeWriter) -> None:
    """Stream bin/ and lib/ollama/ of ollama's archive (.tgz or .tar.zst) into `writer`."""
    name = archive.name
    found = False
    try:
        with open_tar_stream(archive) as tar:
            for info in tar:
                rel = _normalize(info.name, name)
                if not rel or not (any((rel + "/").startswith(k) for k in OLLAMA_KEEP) or rel == "lib"):
                    continue
                if info.isdir():
                    writer.directory(rel)
                elif info.issym():
                    writer.link(rel, info.linkname)
                elif info.islnk():
                    writer.copy(rel, _normalize(info.linkname, name))
                elif info.isfile():
                    handle = tar.extractfile(info)
                    assert handle is not None
                    writer.file(rel, handle, bool(info.mode & 0o111))
                    found = found or rel == "bin/ollama"
                else:
                    raise UnsafeArchive(f"{name}: member '{info.name}' is a device or fifo; refusing to stage it")
    except _archive_errors() as exc:
        raise BuilderError(f"{name}: not a readable tar archive ({exc}); delete it from the cache and fetch again") from None
    if not found:
        raise BuilderError(f"{name}: the ollama archive has no bin/ollama; is ollama.url the ollama-linux-amd64 release (.tgz for 0.5.x, .tar.zst from 0.30)?")


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def select_llama_cpp(archive: zipfile.ZipFile, binaries: tuple[str, ...]) -> list[zipfile.ZipInfo]:
    """The chosen programs of build/bin/ and the libraries they load, by DT_NEEDED."""
    by_name = {
        info.filename[len(LLAMA_BIN):]: info
        for info in archive.infolist()
        if info.filename.startswith(LLAMA_BIN) and "/" not in info.filename[len(LLAMA_BIN):] and not info.is_dir()
    }
    missing = [b for b in binaries if b not in by_name]
    if missing:
        available = sorted(n for n in by_name if n.startswith("llama-"))
        raise BuilderError(
            f"the llama.cpp archive has no {LLAMA_BIN}{missing[0]} (llama_cpp.binaries); it has: {', '.join(available[:12])}"
        )
    wanted: list[str] = []
    queue = list(binaries)
    while queue:
        current = queue.pop(0)
        if current in wanted or current not in by_name:
            continue  # not in the archive: a system library (libc, libgomp)
        wanted.append(current)
        info = by_name[current]
        if stat.S_ISLNK(info.external_attr >> 16):
            queue.append(PurePosixPath(archive.read(info).decode()).name)
        else:
            with archive.open(info) as handle:
                head = handle.read(1 << 20)
            data = head if len(head) < (1 << 20) else archive.read(info)
            queue.extend(elf_needed(data) or [])
    return [by_name[n] for n in sorted(wanted)]


def write_llama_cpp(archive_path: Path, binaries: tuple[str, ...], writer: TreeWriter) -> None:
    name = archive_path.name
    try:
        with zipfile.ZipFile(archive_path) as archive:
            for info in select_llama_cpp(archive, binaries):
                rel = LLAMA_CPP_INNER + _normalize(info.filename, name)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    writer.link(rel, archive.read(info).decode())
                else:
                    with archive.open(info) as handle:
                        writer.file(rel, handle, bool(mode & 0o111))
    except (zipfile.BadZipFile, zlib_error()) as exc:
        raise BuilderError(f"{name}: not a readable zip archive ({exc}); delete it from the cache and fetch again") from None


def _replace_tree(context: Path, relative: str, fill: Callable[[TreeWriter], None], archive: str, epoch: int) -> None:
    """Write the tree beside its final place, then swap it in."""
    final = context / relative
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        writer = TreeWriter(scratch, archive)
        fill(writer)
        writer.finish(epoch)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(scratch, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _stamp(digest: str, selection: tuple[str, ...], epoch: int) -> str:
    return hashlib.sha256(f"{digest}\n{','.join(selection)}\n{epoch}\n".encode()).hexdigest() + "\n"


def is_staged(context: Path, relative: str, digest: str, selection: tuple[str, ...], epoch: int) -> bool:
    """Whether the tree at `relative` is what the archive `digest` stages (its stamp says so)."""
    stamp_file = context / f"{relative}.stamp"
    return (context / relative).is_dir() and stamp_file.is_file() and stamp_file.read_text() == _stamp(digest, selection, epoch)


def stage(context: Path, ollama_archive: Path, ollama_sha: str, llama_archive: Path, llama_sha: str,
          binaries: tuple[str, ...], epoch: int) -> list[str]:
    """Stage both trees unless their stamps say they are already there; return what was (re)staged."""
    done = []
    jobs = (
        ("ollama", STAGED_OLLAMA, ollama_sha, (), ollama_archive.name, lambda w: write_ollama(ollama_archive, w)),
        ("llama.cpp", STAGED_LLAMA_CPP, llama_sha, binaries, llama_archive.name,
         lambda w: write_llama_cpp(llama_archive, binaries, w)),
    )
    for label, relative, digest, selection, archive_name, fill in jobs:
        stamp_file = context / f"{relative}.stamp"
        stamp = _stamp(digest, selection, epoch)
        if is_staged(context, relative, digest, selection, epoch):
            continue
        stamp_file.unlink(missing_ok=True)
        _replace_tree(context, relative, fill, archive_name, epoch)
        write_atomic(stamp_file, stamp.encode(), mtime=epoch)
        done.append(label)
    staged = context / "staged"
    if staged.is_dir():
        os.chmod(staged, 0o755)
        os.utime(staged, (epoch, epoch))
    return done


def unpacked_size(archive: Path) -> int:
    """The bytes an archive's files take unpacked, from its member table; a
    tar's is read by one streaming pass, remembered beside the archive."""
    memo = archive.with_name(archive.name + ".unpacked.json")
    try:
        record = json.loads(memo.read_text())
        if record.get("size") == archive.stat().st_size:
            return int(record["unpacked"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            total = sum(info.file_size for info in handle.infolist())
    else:
        with open_tar_stream(archive) as tar:
            total = sum(info.size for info in tar if info.isfile())
    try:
        memo.write_text(json.dumps({"size": archive.stat().st_size, "unpacked": total}) + "\n")
    except OSError:
        pass  # a read-only cache: measured again next time
    return total
