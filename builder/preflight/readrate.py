"""How fast a place reads: a bounded, cold, sequential read (doctor's read-rate lines).

Where the model's bytes live decides how long a load takes: a 158 GB model
reads in 24 minutes from a 1 GbE share and in 2 from a local NVMe disk.
`measure` reads one file for a few seconds with its cached pages dropped
first, so the number is the storage's, not the page cache's. Standard
library only; the only thing it ever writes or deletes is its own
temporary file.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 8 << 20  # the largest read; large enough that the per-call cost is nothing beside the storage's
FIRST = 1 << 20  # the first (and smallest) read: 1 s on 1 MB/s storage
SAMPLE = 256 << 20  # the temporary file written where the folder has no model file
SMALL = 16 << 20  # a model file below this ends before a rate means anything
TEMP_PREFIX = ".builder-readrate-"


@dataclass(frozen=True)
class ReadRate:
    """`bytes` read from `path` (a file, or the folder `file` was in) in `seconds`."""

    path: Path
    bytes: int
    seconds: float
    what: str = "storage"
    file: Path | None = None  # the file actually read (a temporary one is gone by now)

    @property
    def mb_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        rate = f"{self.mb_s:.1f}" if self.mb_s < 10 else f"{self.mb_s:.0f}"
        return f"{self.what} {self.path}: {rate} MB/s ({self.bytes / 1e6:.0f} MB in {self.seconds:.1f} s)"


def load_seconds(size_bytes: int, rate: ReadRate) -> float:
    """How long reading `size_bytes` takes at `rate` (inf when nothing was read)."""
    per_second = rate.bytes / rate.seconds if rate.seconds > 0 else 0.0
    return size_bytes / per_second if per_second > 0 else float("inf")


def measure(path: Path, seconds: float = 3.0, limit: int = 1 << 30, what: str = "storage") -> ReadRate:
    """Read `path` (a file; a folder: its largest *.gguf, else a temporary
    file written there) cold for at most `seconds` or `limit` bytes. Raises
    OSError (FileNotFoundError, PermissionError, ...) with one clear line."""
    path = Path(path)
    if path.is_file():
        return _timed(path, path, seconds, limit, what)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    found = largest_gguf(path)
    if found is not None and (found.stat().st_size >= min(limit, SMALL) or not os.access(path, os.W_OK)):
        return _timed(path, found, seconds, limit, what)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{path} has no model file to read and cannot be written for a test file")
    temp = write_sample(path, min(limit, SAMPLE), seconds)
    try:
        return _timed(path, temp, seconds, limit, what)
    finally:
        temp.unlink(missing_ok=True)


def largest_gguf(folder: Path, depth: int = 2) -> Path | None:
    """The largest *.gguf in `folder` and its subfolders `depth` levels down (a bounded walk)."""
    best: tuple[int, Path] | None = None
    level = [folder]
    for _ in range(depth):
        below = []
        for where in level:
            try:
                entries = list(os.scandir(where))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_dir():
                        below.append(Path(entry.path))
                    elif entry.name.endswith(".gguf") and entry.is_file():
                        size = entry.stat().st_size
                        if best is None or size > best[0]:
                            best = (size, Path(entry.path))
                except OSError:
                    continue
        level = below
    return best[1] if best else None


def write_sample(folder: Path, size: int, seconds: float) -> Path:
    """A temporary file of up to `size` incompressible bytes (at most `seconds`
    of writing), synced so its pages are clean and can be dropped."""
    block = bytearray(os.urandom(CHUNK))
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        deadline, written = time.monotonic() + seconds, 0
        while written < size and time.monotonic() < deadline:
            block[:8] = written.to_bytes(8, "little")  # no two blocks alike: no dedup
            written += os.write(fd, memoryview(block)[: size - written])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return Path(name)


def _timed(place: Path, file: Path, seconds: float, limit: int, what: str) -> ReadRate:
    """Drop the pages about to be read (only those: a loaded model's cache stays), then read them in order."""
    buffer = memoryview(bytearray(CHUNK))
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, limit, os.POSIX_FADV_DONTNEED)
        done, started, want = 0, time.monotonic(), FIRST
        while done < limit and (elapsed := time.monotonic() - started) < seconds:
            if done:  # what the rate so far reads in the time left: slow storage ends near `seconds`
                want = max(FIRST, min(CHUNK, int(done / elapsed * (seconds - elapsed))))
            got = os.readv(fd, [buffer[: min(want, limit - done)]])
            if got == 0:
                break
            done += got
        elapsed = time.monotonic() - started
    finally:
        os.close(fd)
    return ReadRate(place, done, elapsed, what, file)
