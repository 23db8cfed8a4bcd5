"""Moving images without a registry: export to a compressed archive with its
sha256 beside it, import it elsewhere; or push to a registry of one's own.

The image ID is the sha256 of the image's config, so `docker load` of an
exported archive gives the same ID on the other machine.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from pathlib import Path

from builder.errors import BuilderError, ConfigError
from builder.fsutil import sha256_file

CHUNK = 1 << 20


def default_archive_name(image: str) -> str:
    name, _, tag = image.rpartition(":")
    return f"{name.replace('/', '_')}-{tag}.tar.gz"


class _HashingWriter:
    """A file wrapper that hashes what is written through it."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def export_image(engine, image: str, out: Path, echo) -> str:
    """Write `image` to `out` (gzip) and `out`.sha256; return the sha256."""
    if engine.image_id(image) is None:
        raise BuilderError(f"{image} is not in the engine; build it first (builder build)")
    from builder.preflight.disk import Need, check_space

    # gzip shrinks ollama's libraries little: the image's size bounds the archive
    for line in check_space([Need("export archive", out.parent, engine.image_size(image))]):
        echo(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            hashing = _HashingWriter(raw)
            # mtime 0 and no file name: the gzip wrapper adds nothing that varies.
            with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, mtime=0, compresslevel=6) as archive:
                written = 0
                for chunk in engine.save(image):
                    archive.write(chunk)
                    written += len(chunk)
            raw.flush()
            os.fsync(raw.fileno())
        digest = hashing.digest.hexdigest()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sidecar = out.with_name(out.name + ".sha256")
    sidecar.write_text(f"{digest}  {out.name}\n")
    echo(f"exported {image} ({written >> 20} MiB uncompressed) to {out}")
    return digest


def import_image(connect, archive: Path, echo) -> list[str]:
    """Check `archive` against its .sha256 (when present) and load it into
    the engine `connect()` returns (asked only once the archive is checked)."""
    if not archive.is_file():
        raise ConfigError(f"{archive}: no such file")
    sidecar = archive.with_name(archive.name + ".sha256")
    if sidecar.is_file():
        expected = sidecar.read_text().split()[0] if sidecar.read_text().split() else ""
        actual = sha256_file(archive)
        if actual != expected:
            raise BuilderError(f"{archive}: sha256 is {actual}, but {sidecar.name} says {expected}; copy it again")
        echo(f"{archive.name}: sha256 matches {sidecar.name}")
    else:
        echo(f"warning: no {sidecar.name} beside {archive.name}; loading it unchecked")
    opener = gzip.open if archive.read_bytes()[:2] == b"\x1f\x8b" else open
    engine = connect()
    with opener(archive, "rb") as stream:
        return engine.load_stream(stream)


def push_target(target: str, registry_mirror: str) -> str:
    """REGISTRY/REPO[:TAG]; a target without a registry host goes to the mirror."""
    name = target.rsplit("@", 1)[0]
    first = name.split("/", 1)[0]
    has_host = "/" in name and ("." in first or ":" in first or first == "localhost")
    if not has_host and registry_mirror:
        target = f"{registry_mirror.rstrip('/')}/{target}"
    repository, _, tag = target.rpartition(":")
    if not repository or "/" in tag:
        target = f"{target}:latest"
    return target
