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
  beside them in the cache (image.stage.unpacked_size);
- the engine's data root (`docker info`'s DockerRootDir): BuildKit's copy of
  the context plus the image's layers, about twice the staged trees
  (DATA_ROOT_FACTOR, measured: README), and the base image when missing;
- `export`'s archive: at most the image's size (gzip shrinks it a little).
"""

from __future__ import annotations

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


def check_space(needs: list[Need], free=free_space, move: str = "cache_dir, host.prefix, --out, the engine's data-root") -> list[str]:
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
                f"free {_gib(total - available)} or move it ({move})"
            )
        lines.append(f"space: {parts}: needs {_gib(total)} with slack, {_gib(available)} free")
    return lines


def _gib(size: float) -> str:
    return f"{size / (1 << 30):.2f} GiB"


def engine_needs(data_root: str | None, staged_bytes: int, base_missing: bool) -> list[Need]:
    """The engine's data root: BuildKit's copy of the context and the image layers."""
    if not data_root:
        return []
    size = int(staged_bytes * DATA_ROOT_FACTOR) + (BASE_IMAGE_BYTES if base_missing else 0)
    return [Need("image build", Path(data_root), size)]


def model_cache_needs(config, facts) -> list[Need]:
    """storage.model_cache: what merge and create will write there, before
    they start. ollama 0.5.7: the merged file (none when it is there, whole);
    0.30+: the shards copied in (a link cannot cross disks) and the model
    twice (its rewrite and the copy under its digest), none once created."""
    from builder.supervisor.common import CURRENT

    cache = config.storage.model_cache
    if not cache or facts is None:
        return []
    if config.ollama_generation == CURRENT:
        from builder.supervisor.create import created_summary

        if created_summary(str(Path(cache) / "ollama"), config.model.name):
            return []
        return [Need(f"ollama {config.ollama.version}'s create (the shards copied in, the model written twice)", Path(cache), 3 * facts.file_bytes)]
    if facts.merged_present or not config.model.shards.count:
        return []
    return [Need("the merged model", Path(cache), facts.file_bytes)]
