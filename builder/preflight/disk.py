"""Disk space, checked before anything is written: one line per place that a
fetch, a stage or a build will fill, with the bytes it needs and the bytes
free. Places on one file system are added up (the cache, the context and the
engine's data root often share the root disk of a rented instance).

What each place needs:
- the download cache: every release archive not in it yet, at the size
  builder.lock records (a fetch without a lock checks the size the server
  announces before it writes: builder.image.fetch);
- the staged trees (the build context's staged/, the host target's prefix):
  the archives' unpacked sizes, read from their member tables once and kept
  beside them in the cache;
- the engine's data root (`docker info`'s DockerRootDir): BuildKit's copy of
  the context plus the image's layers, about twice the staged trees
  (DATA_ROOT_FACTOR, measured: README), and the base image when missing;
- `export`'s archive: at most the image's size (gzip shrinks it a little).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError
from builder.preflight.machine import free_space

DATA_ROOT_FACTOR = 2.0  # BuildKit's context copy + the image layers, per staged byte
BASE_IMAGE_BYTES = 200 << 20  # mmdebstrap's minbase with python3: about 120 MB, loaded once
SLACK = 256 << 20  # never plan to fill a disk to its last byte


class NoSpace(BuilderError):
    """A place that will be written has too little free space (exit 1)."""


@dataclass(frozen=True)
class Need:
    place: str  # what is written there, in the user's words
    path: Path
    bytes: int


def check_space(needs: list[Need], free=free_space) -> list[str]:
    """Refuse in one line when the places on some file system need more than
    it has free; return one line per file system for the log."""
    by_device: dict[int, list[tuple[Need, int]]] = {}
    for need in needs:
        if need.bytes <= 0:
            continue
        space = free(need.path)
        by_device.setdefault(space.device, []).append((need, space.free))
    lines = []
    for group in by_device.values():
        total = sum(need.bytes for need, _ in group) + SLACK
        available = group[0][1]
        parts = " + ".join(f"{need.place} {_gib(need.bytes)} ({need.path})" for need, _ in group)
        if total > available:
            raise NoSpace(
                f"not enough disk space: {parts} need {_gib(total)} with {_gib(SLACK)} slack, {_gib(available)} free there; "
                f"free {_gib(total - available)} or move it (cache_dir, host.prefix, --out, the engine's data-root)"
            )
        lines.append(f"space: {parts}: {_gib(total)} of {_gib(available)} free")
    return lines


def _gib(size: float) -> str:
    return f"{size / (1 << 30):.2f} GiB"


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
        from builder.image.stage import open_tar_stream

        with open_tar_stream(archive) as tar:
            total = sum(info.size for info in tar if info.isfile())
    try:
        memo.write_text(json.dumps({"size": archive.stat().st_size, "unpacked": total}) + "\n")
    except OSError:
        pass  # a read-only cache: measured again next time
    return total


def fetch_needs(config_path: str, config, cache_dir: Path) -> list[Need]:
    """The download cache: the archives builder.lock records that the cache lacks."""
    from builder.image.fetch import ArtifactCache, plan_artifacts
    from builder.image.lock import lock_path, read_lock

    cache = ArtifactCache(cache_dir)
    locked = read_lock(lock_path(config_path))
    needs = []
    for artifact in plan_artifacts(config):
        entry = locked.get(artifact.key)
        if entry is not None and entry.url == artifact.url and not cache.path(entry.sha256).is_file():
            needs.append(Need(f"download of {artifact.filename}", cache.root, entry.size))
    return needs


def stage_needs(staged_root: Path, archives: list[Path], already: bool) -> list[Need]:
    """The staged trees under `staged_root` (a build context, the host prefix):
    the archives unpacked, unless they are staged already."""
    if already:
        return []
    return [Need("staged releases", staged_root, sum(unpacked_size(a) for a in archives))]


def engine_needs(data_root: str | None, staged_bytes: int, base_missing: bool) -> list[Need]:
    """The engine's data root: BuildKit's copy of the context and the image layers."""
    if not data_root:
        return []
    size = int(staged_bytes * DATA_ROOT_FACTOR) + (BASE_IMAGE_BYTES if base_missing else 0)
    return [Need("image build", Path(data_root), size)]
