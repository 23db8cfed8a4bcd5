"""Logging, progress and small file helpers shared by the supervisor's roles."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import urllib.request
import sys
import tempfile
import time
from contextlib import contextmanager


# ollama generations (builder.config.releases): runtime.json's ollama_generation
# is CURRENT for ollama 0.30 and later and absent for 0.5.x (LEGACY).
LEGACY = "0.5"
CURRENT = "0.30"


def is_current(runtime: dict) -> bool:
    """ollama 0.30+: creates from the shards, so nothing is merged."""
    return runtime.get("ollama_generation") == CURRENT


def with_model_cache(runtime: dict, cache: str | None) -> dict:
    """runtime.json with the merged file and ollama's store moved into the
    model cache (storage.model_cache; BUILDER_MODEL_CACHE in a container):
    the same names under the cache instead of the model volume, which the
    stack then only reads."""
    if not cache:
        return runtime
    models = runtime["models_dir"]
    moved = dict(runtime, model_cache=cache)
    for key in ("merged", "ollama_store"):
        moved[key] = os.path.join(cache, os.path.relpath(runtime[key], models))
    return moved


def shard_paths(runtime: dict) -> list[str]:
    """Every shard's path, in order (the one file of an unsplit model)."""
    from .shards import shard_file_names

    shards = runtime["shards"]
    if not shards.get("count"):
        return [shards["first"]]
    folder = os.path.dirname(shards["first"])
    return [os.path.join(folder, name) for name in shard_file_names(shards["prefix"], shards["count"])]


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: unwind, cleaning up, and exit."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class StepError(Exception):
    """A role failed: one line naming the file or step, then a non-zero exit."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def log(message: str) -> None:
    print(f"supervisor: {message}", flush=True)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


QUIET_BELOW = 64 << 20  # work this small ends before anyone reads a progress line


class Progress:
    """A redrawn line on a terminal; a line every 10% otherwise (container
    logs), except for work under 64 MiB. `sizes=False` shows the share only
    (for a total that is someone else's, like ollama's rewrite)."""

    def __init__(self, label: str, total: int, sizes: bool = True):
        self.label = label
        self.total = max(total, 1)
        self.tty = sys.stdout.isatty()
        self.next_step = 10 if total >= QUIET_BELOW else math.inf
        self.sizes = sizes
        self.began = time.monotonic()

    def update(self, done: int) -> None:
        share = min(100.0, done * 100.0 / self.total)
        amount = f" ({human_bytes(done)} of {human_bytes(self.total)})" if self.sizes else ""
        if self.tty:
            sys.stdout.write(f"\rsupervisor: {self.label} {share:5.1f}%{amount}")
            sys.stdout.flush()
        elif share >= self.next_step:
            log(f"{self.label} {int(share)}%{amount}")
            while self.next_step <= share:
                self.next_step += 10

    def finish(self) -> float:
        seconds = time.monotonic() - self.began
        if self.tty:
            sys.stdout.write("\n")
        return seconds


def io_counters(pid: str = "self") -> tuple[int, int]:
    """Bytes a process has read and written through system calls (/proc/PID/io)."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as handle:
            fields = dict(line.split(": ", 1) for line in handle.read().splitlines() if ": " in line)
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def sha256_of(path: str, label: str) -> str:
    """Read `path` once to hash it, with progress (for files not merged by us)."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    progress = Progress(label, size)
    done = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(8 << 20)
        view = memoryview(buffer)
        while True:
            count = handle.readinto(view)
            if not count:
                break
            digest.update(view[:count])
            done += count
            progress.update(done)
    progress.finish()
    return digest.hexdigest()


def write_json_atomic(path: str, data: dict) -> None:
    """Write `data` as JSON through a temporary file, fsync and rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def file_lock(path: str, waiting: str):
    """Hold an exclusive POSIX lock on `path` (created if need be); say `waiting` if it is taken."""
    with open(path, "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(waiting)
            fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def place_blob(merged: str, store: str, digest: str, may_link=lambda path: None) -> str:
    """Put a file (the merged model, or a shard) in ollama's blob store as
    blobs/sha256-HEX by a hard link; say how ('present', 'linked', or why
    not). `may_link(path)` returns why a link would not do, or None."""
    blobs = os.path.join(store, "blobs")
    os.makedirs(blobs, exist_ok=True)
    blob = os.path.join(blobs, f"sha256-{digest}")
    if os.path.exists(blob) and os.path.getsize(blob) == os.path.getsize(merged):
        if os.path.samefile(blob, merged) or os.stat(blob).st_dev != os.stat(merged).st_dev or may_link(merged):
            return "present"  # the file itself, or a copy where no link can be made
        # Another file under this digest on the same disk (the old link of a
        # merged file merged again): link the file the record describes.
    refused = may_link(merged)
    if refused:
        return f"not linked ({refused})"
    if os.path.exists(blob):
        os.unlink(blob)  # a partial upload from an earlier run: ollama's own temp would be misnamed
    tmp = os.path.join(blobs, f".sha256-{digest}.link-{os.getpid()}")
    try:
        os.link(merged, tmp)
        os.replace(tmp, blob)
        return "linked"
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES, errno.ENOSYS):
            return f"not linked ({exc.strerror})"
        if exc.errno == errno.EIO and not links_here(blobs):
            # Some FUSE file systems (rclone's mount, for one) have no hard
            # links and answer link() with EIO; a real I/O error stays fatal.
            return "not linked (this file system answers every link() with an I/O error: it has no hard links)"
        raise


def links_here(folder: str) -> bool:
    """Whether `folder`'s file system makes a hard link of a new empty file."""
    probe = os.path.join(folder, f".link-probe-{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
        try:
            os.link(probe, probe + ".2")
        except OSError:
            return False
        os.unlink(probe + ".2")
        return True
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


# Every HTTP call the supervisor makes goes to an ollama on loopback: never
# through a proxy, whatever http_proxy and no_proxy say (AutoDL's network
# acceleration exports http_proxy; urllib would send 127.0.0.1 to it).
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def open_loopback(req: urllib.request.Request, timeout: float | None):
    """urlopen without any proxy."""
    return _LOOPBACK.open(req, timeout=timeout)
