"""How far a model load has got, read from the runner process itself.

ollama's OLLAMA_LOAD_TIMEOUT is a stall timer: it gives up on a load only
after that long without progress (0.5.7: the runner's progress; 0.30+: any
output from llama-server). So the warm-up must never hang up on a load that
is progressing, and `builder up` wants to show how far it got.

The signal is what the runner has read of the model, from /proc:

* the offset of the runner's open file on the model (/proc/PID/fdinfo):
  with --no-mmap (ollama 0.5.7 forces it when free RAM is below the model
  size) llama.cpp reads the whole file in order through it.
* the resident pages of the model file's mappings in /proc/PID/smaps: with
  mmap (ollama's choice with GPUs and RAM to spare) llama.cpp maps the file
  with MAP_POPULATE (llama-mmap.cpp), which reads all of it into the page
  cache before the load goes on.

Why not ollama's own progress: 0.5.7's runner reports llama.cpp's progress
callback (its /health), which stays at 0 while MAP_POPULATE reads the whole
model and then jumps to 100 %; 0.30+ reports none; ollama's debug log would
print prompts. Bytes read
are the same quantity for both generations, every runner and both modes,
and they are what slow storage limits. The process is found as the child of
`ollama serve` whose command line names `--model`; /proc of a process of the
same user is readable without privileges.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

@dataclass(frozen=True)
class Runner:
    pid: int
    model: str
    mmap: bool


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (every thread's children)."""
    if not os.path.exists(f"/proc/self/task/{os.getpid()}/children"):  # a kernel without CONFIG_PROC_CHILDREN
        return [other for other in _all_pids() if _parent(other) == pid]
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                found += [int(word) for word in handle.read().split()]
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    return found


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            return int(handle.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def find_runner(server_pid: int | None) -> Runner | None:
    """The runner that `ollama serve` (server_pid) started: a descendant whose
    command line has `--model PATH`."""
    if not server_pid:
        return None
    queue = deque(children(server_pid))
    seen = set()
    while queue:
        pid = queue.popleft()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = [a.decode("utf-8", "replace") for a in handle.read().split(b"\0") if a]
        except OSError:
            continue
        for flag in ("--model", "-m"):
            if flag in argv[:-1]:
                return Runner(pid, argv[argv.index(flag) + 1], mapped(argv))
        queue.extend(children(pid))
    return None


def mapped(argv: list[str]) -> bool:
    """Whether the runner maps the model: not with --no-mmap (0.5.7, llama.cpp)
    nor with --load-mode none or dio (what ollama 0.30+ passes llama-server)."""
    if "--no-mmap" in argv:
        return False
    if "--load-mode" in argv[:-1] and argv[argv.index("--load-mode") + 1] in ("none", "dio"):
        return False
    return True


def bytes_read(runner: Runner) -> int:
    """How far the runner has read the model file (the offset of its open
    file on it, /proc/PID/fdinfo) plus the model's resident mapped pages
    (see the module's docstring). Not rchar: that counts the runner's
    socket reads too (ollama polls its /health four times a second)."""
    return file_offset(runner) + mapped_resident(runner)


def file_offset(runner: Runner) -> int:
    """The largest offset of the runner's open files on the model."""
    total = 0
    real = os.path.realpath(runner.model)
    try:
        for fd in os.listdir(f"/proc/{runner.pid}/fd"):
            try:
                if os.readlink(f"/proc/{runner.pid}/fd/{fd}") not in (runner.model, real):
                    continue
                with open(f"/proc/{runner.pid}/fdinfo/{fd}", encoding="ascii") as handle:
                    position = next(int(line.split()[1]) for line in handle if line.startswith("pos:"))
                total = max(total, position)
            except (OSError, ValueError, StopIteration):
                continue
    except OSError:
        pass
    return total


def mapped_resident(runner: Runner) -> int:
    """The resident bytes of the runner's mappings of the model (/proc/PID/smaps:
    a walk of the mapping's page tables, so not every second for a big one)."""
    total = 0
    real = os.path.realpath(runner.model)
    try:
        inside = False
        with open(f"/proc/{runner.pid}/smaps", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                head = line.split(None, 1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):  # a mapping's first line
                    parts = line.split(None, 5)
                    inside = len(parts) == 6 and parts[5].strip() in (runner.model, real)
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return total


class Rate:
    """Bytes per second over the last `window` seconds."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, when: float, done: int) -> float:
        self.samples.append((when, done))
        while len(self.samples) > 2 and when - self.samples[0][0] > self.window:
            self.samples.popleft()
        first_t, first_n = self.samples[0]
        return (done - first_n) / (when - first_t) if when > first_t else 0.0


def model_blob(store: str, model: str) -> str | None:
    """The model layer's blob in ollama's store (its manifest names it), or None."""
    import json

    from .ollama import manifest_path

    try:
        with open(manifest_path(store, model), encoding="utf-8") as handle:
            layers = json.load(handle).get("layers") or []
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == "application/vnd.ollama.image.model")
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    path = os.path.join(store, "blobs", str(digest).replace(":", "-"))
    return path if os.path.isfile(path) else None


READ_AHEAD_MARGIN = 2 << 30  # RAM left to everything else when a model is read through the page cache


def available_ram() -> int | None:
    """What may still be filled with page cache: MemAvailable, or less where a
    cgroup limit (v2 or v1) says so."""
    values = []
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    values.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as handle:
                limit = handle.read().strip()
            with open(usage_file, encoding="ascii") as handle:
                usage = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            values.append(max(0, int(limit) - usage))
    return min(values) if values else None


def read_through(path: str, on_progress, stop, chunk: int = 16 << 20) -> int:
    """Read `path` once, in order, into the page cache; `on_progress(bytes)`
    about once a second; stops early when `stop` is set. Returns the bytes read."""
    import time

    done, last = 0, 0.0
    with open(path, "rb", buffering=0) as handle:
        try:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        view = memoryview(bytearray(chunk))
        while not stop.is_set():
            count = handle.readinto(view)
            if not count:
                break
            done += count
            now = time.monotonic()
            if now - last >= 1.0:
                on_progress(done)
                last = now
    on_progress(done)
    return done
