"""How far a model load has got, read from the runner process itself.

ollama's OLLAMA_LOAD_TIMEOUT is a stall timer: it gives up on a load only
after that long without progress (0.5.7: the runner's progress; 0.30+: any
output from llama-server). So the warm-up must never hang up on a load that
is progressing, and `builder up` wants to show how far it got.

The signal is what the runner has read of the model, from /proc:

* `rchar` of /proc/PID/io: bytes returned by read() calls. With --no-mmap
  (ollama 0.5.7 forces it when free RAM is below the model size) llama.cpp
  reads the whole file this way.
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
                return Runner(pid, argv[argv.index(flag) + 1], "--no-mmap" not in argv)
        queue.extend(children(pid))
    return None


def bytes_read(runner: Runner) -> int:
    """rchar plus the model's resident mapped pages (see the module's docstring)."""
    total = 0
    try:
        with open(f"/proc/{runner.pid}/io", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("rchar:"):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        pass
    try:
        real = os.path.realpath(runner.model)
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
