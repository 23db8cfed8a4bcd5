"""Staging release archives into the build context: what is kept, how it is
normalized, and which archives are refused (with nothing left behind)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import zstandard

from builder.errors import BuilderError
from builder.image.stage import UnsafeArchive, stage
from tests.fixtures.llama_cpp_release import llama_cpp_release_zip
from tests.fixtures.ollama_release import ollama_release_tar_zst, ollama_release_tgz

EPOCH = 1738368000


def tree(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every entry: (kind, mode, mtime, content or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", 0, int(info.st_mtime), os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", info.st_mode & 0o777, int(info.st_mtime), "")
        else:
            out[rel] = ("file", info.st_mode & 0o777, int(info.st_mtime), hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def run_stage(context: Path, ollama: Path, llama: Path, binaries=("llama-gguf-split",)) -> list[str]:
    return stage(context, ollama, "a" * 64, llama, "b" * 64, binaries, EPOCH)


@pytest.fixture(scope="module")
def llama_zip() -> Path:
    return llama_cpp_release_zip()


def test_stages_what_the_image_needs(tmp_path: Path, llama_zip: Path) -> None:
    ollama = write(tmp_path / "ollama.tgz", ollama_release_tgz(extra={}))  # the test archive: its layout is asserted
    context = tmp_path / "ctx"
    assert run_stage(context, ollama, llama_zip) == ["ollama", "llama.cpp"]
    staged = tree(context / "staged")
    assert sorted(k for k in staged if k.startswith("llama.cpp/llama.cpp/build/bin/")) == [
        f"llama.cpp/llama.cpp/build/bin/{n}"
        for n in ("libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so", "llama-gguf-split")
    ]
    assert staged["ollama/bin/ollama"][:2] == ("file", 0o755)
    assert staged["ollama/lib/ollama/libggml-base.so"][::3] == ("link", "libggml-base.so.double")
    assert staged["llama.cpp/llama.cpp/build/bin/libllama.so"][:2] == ("file", 0o644)
    assert {entry[2] for entry in staged.values()} == {EPOCH}
    # Every staged file is its archive member, whole.
    with tarfile.open(ollama) as archive:
        for member in archive.getmembers():
            if member.isfile():
                rel = "ollama/" + member.name.removeprefix("./")
                assert staged[rel][3] == hashlib.sha256(archive.extractfile(member).read()).hexdigest(), rel
    with zipfile.ZipFile(llama_zip) as archive:
        for rel, entry in staged.items():
            if rel.startswith("llama.cpp/llama.cpp/") and entry[0] == "file":
                member = rel.removeprefix("llama.cpp/llama.cpp/")
                assert entry[3] == hashlib.sha256(archive.read(member)).hexdigest(), rel
    assert {entry[1] for entry in staged.values() if entry[0] == "dir"} == {0o755}
    # Unchanged archives: nothing is staged again.
    assert run_stage(context, ollama, llama_zip) == []


def test_staging_is_byte_stable(tmp_path: Path, llama_zip: Path) -> None:
    ollama = write(tmp_path / "ollama.tgz", ollama_release_tgz())
    old = os.umask(0o002)  # a machine with another umask gets the same tree
    try:
        run_stage(tmp_path / "a", ollama, llama_zip)
    finally:
        os.umask(old)
    run_stage(tmp_path / "b", ollama, llama_zip)
    assert tree(tmp_path / "a" / "staged") == tree(tmp_path / "b" / "staged")


def tgz(members: list[tuple[str, str, bytes | str]]) -> bytes:
    """members: (name, kind: file|dir|sym|hard|dev, data or link target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size, info.mode = len(data), 0o755
                archive.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "dev": tarfile.CHRTYPE}[kind]
            if kind in ("sym", "hard"):
                info.linkname = str(payload)
            archive.addfile(info)
    return buffer.getvalue()


OK_BIN = ("bin/ollama", "file", b"#!/bin/sh\n")

BAD_ARCHIVES = {
    "dotdot": ([OK_BIN, ("bin/../../evil", "file", b"x")], "member 'bin/../../evil' climbs out with '..'"),
    "absolute": ([OK_BIN, ("/etc/evil", "file", b"x")], "member '/etc/evil' is an absolute path"),
    "link-absolute": ([OK_BIN, ("lib/ollama/x.so", "sym", "/etc/shadow")], "link 'lib/ollama/x.so' points to the absolute path '/etc/shadow'"),
    "link-escapes": ([OK_BIN, ("lib/ollama/x.so", "sym", "../../../x")], "link 'lib/ollama/x.so' -> '../../../x' leaves the archive"),
    "link-chain": (
        [OK_BIN, ("bin/a", "sym", "."), ("bin/a/b", "sym", ".."), ("bin/a/b/PWNED", "file", b"x")],
        "member 'bin/a/b' would be written through the link 'bin/a'",
    ),
    "device": ([OK_BIN, ("bin/null", "dev", "")], "member 'bin/null' is a device or fifo"),
    "no-ollama": ([("bin/other", "file", b"x")], "the ollama archive has no bin/ollama"),
    "hard-link-nowhere": ([OK_BIN, ("bin/x", "hard", "bin/missing")], "hard link 'bin/x' -> 'bin/missing' has no file to point to"),
}


@pytest.mark.parametrize("suffix", [".tgz", ".tar.zst"])
@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archives_are_refused_and_leave_nothing(case: str, suffix: str, tmp_path: Path, llama_zip: Path) -> None:
    members, message = BAD_ARCHIVES[case]
    data = tgz(members)
    if suffix == ".tar.zst":
        data = zstandard.ZstdCompressor().compress(gzip.decompress(data))
    ollama = write(tmp_path / f"ollama-linux-amd64{suffix}", data)
    context = tmp_path / "ctx"
    context.mkdir()
    with pytest.raises(BuilderError) as error:
        run_stage(context, ollama, llama_zip)
    assert message in str(error.value)
    assert str(error.value).startswith(f"ollama-linux-amd64{suffix}: ")
    leftovers = sorted(str(p.relative_to(context)) for p in context.rglob("*"))
    assert leftovers in ([], ["staged"]), leftovers
    assert not (tmp_path / "PWNED").exists() and not (context / "PWNED").exists()


def test_unsafe_is_a_builder_error() -> None:
    assert issubclass(UnsafeArchive, BuilderError)


def test_missing_llama_binary_names_what_is_there(tmp_path: Path, llama_zip: Path) -> None:
    ollama = write(tmp_path / "ollama.tgz", ollama_release_tgz())
    with pytest.raises(BuilderError, match=r"has no build/bin/llama-imatrix \(llama_cpp.binaries\); it has: llama-gguf-split, llama-quantize, llama-server, llama-simple$"):
        run_stage(tmp_path / "ctx", ollama, llama_zip, binaries=("llama-gguf-split", "llama-imatrix"))


def test_corrupt_archive(tmp_path: Path, llama_zip: Path) -> None:
    ollama = write(tmp_path / "ollama-linux-amd64.tgz", ollama_release_tgz()[:300])
    with pytest.raises(BuilderError, match=r"^ollama-linux-amd64.tgz: not a readable tar archive"):
        run_stage(tmp_path / "ctx", ollama, llama_zip)


def test_corrupt_tar_zst(tmp_path: Path, llama_zip: Path) -> None:
    whole = ollama_release_tar_zst()
    for cut, name in ((len(whole) // 2, "half"), (40, "header")):
        ollama = write(tmp_path / "ollama-linux-amd64.tar.zst", whole[:cut])
        with pytest.raises(BuilderError, match=r"^ollama-linux-amd64.tar.zst: not a readable tar archive \(.+\); delete it"):
            run_stage(tmp_path / f"ctx-{name}", ollama, llama_zip)
        assert not (tmp_path / f"ctx-{name}" / "staged" / "ollama").exists()


def test_stages_a_current_release_tar_zst(tmp_path: Path, llama_zip: Path) -> None:
    """ollama 0.30+: .tar.zst, llama-server and llama-quantize in lib/ollama/, streamed (no temporary tar)."""
    data = ollama_release_tar_zst()
    assert data[:4] == b"\x28\xb5\x2f\xfd"
    ollama = write(tmp_path / "ollama-linux-amd64.tar.zst", data)
    context = tmp_path / "ctx"
    assert run_stage(context, ollama, llama_zip) == ["ollama", "llama.cpp"]
    staged = tree(context / "staged")
    for program in ("bin/ollama", "lib/ollama/llama-server", "lib/ollama/llama-quantize"):
        assert staged[f"ollama/{program}"][:2] == ("file", 0o755), program
    assert staged["ollama/lib/ollama/libllama.so"][:2] == ("file", 0o644)
    assert staged["ollama/lib/ollama/cuda_v12"][:2] == ("dir", 0o755)
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    with tarfile.open(fileobj=io.BytesIO(plain)) as archive:
        files = [m for m in archive.getmembers() if m.isfile()]
        assert files
        for member in files:
            rel = "ollama/" + member.name.removeprefix("./")
            assert staged[rel][3] == hashlib.sha256(archive.extractfile(member).read()).hexdigest(), rel
    assert {entry[2] for entry in staged.values()} == {EPOCH}
    # The double says which version it is: the archive of 0.32.15 carries 0.32.15.
    assert b'\nVERSION = "0.32.15"\n' in (context / "staged" / "ollama" / "bin" / "ollama").read_bytes()
    assert run_stage(context, ollama, llama_zip) == []
