"""What this machine has, read through small functions the tests can point
elsewhere (`root`): the GPUs (nvidia-smi), RAM and swap (/proc/meminfo and
the process's memory cgroup, v1 or v2), free disk space (statvfs).

RAM is the smaller of /proc/meminfo and the cgroup's limit: inside a
container started with a memory limit /proc/meminfo still shows the whole
host (ollama reads only /proc/meminfo), while on AutoDL, whose instances
mount LXCFS, /proc/meminfo already shows the instance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from builder.config import Config
from builder.errors import ConfigError, Problem

UNLIMITED = 1 << 62  # what a cgroup limit above this means: none (v1 writes 2^63 rounded down to pages)


@dataclass(frozen=True)
class Gpu:
    """One GPU as nvidia-smi reports it, in bytes."""

    index: int
    name: str
    total: int
    free: int
    uuid: str = ""


def _smi(*query: str) -> list[list[str]] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return [[part.strip() for part in line.split(",")] for line in result.stdout.strip().splitlines() if line.strip()]


def _mib(text: str) -> int:
    try:
        return int(float(text)) << 20
    except ValueError:  # "[N/A]" where the driver does not say
        return 0


def query_gpus() -> list[Gpu] | None:
    """Each GPU nvidia-smi sees; None without nvidia-smi."""
    rows = _smi("--query-gpu=index,name,memory.total,memory.free,uuid")
    if rows is None:
        return None
    return [Gpu(int(r[0]), r[1], _mib(r[2]), _mib(r[3]), r[4] if len(r) > 4 else "") for r in rows if len(r) >= 4]


def runner_model(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The model file an ollama runner process was started with (its
    `--model`/`-m` argument), or None for any other process."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv]
    for flag, value in zip(args, args[1:]):
        if flag in ("--model", "-m"):
            return value
    return None


def own_gpu_use(stores: list[Path], proc: Path = Path("/proc")) -> dict[str, int]:
    """GPU memory (by GPU uuid) held by runners of this stack: processes
    whose model is a blob of one of `stores` (ollama's blobs are named by
    their digest, so a runner of this model, in a container or not, names a
    file that is in this store). Planning counts it as free: ollama unloads
    its own model before loading the new plan."""
    rows = _smi("--query-compute-apps=pid,gpu_uuid,used_memory") or []
    held: dict[str, int] = {}
    for row in rows:
        if len(row) < 3 or not row[0].isdigit():
            continue
        model = runner_model(int(row[0]), proc)
        if model is None or not Path(model).name.startswith("sha256-"):
            continue
        if any(_same_blob(int(row[0]), model, store / "blobs" / Path(model).name, proc) for store in stores):
            held[row[1]] = held.get(row[1], 0) + _mib(row[2])
    return held


def _same_blob(pid: int, model: str, blob: Path, proc: Path) -> bool:
    """Whether a runner's model is `blob`: the same file seen through the
    runner's own root (its container's mounts), else, where that cannot be
    looked into (another user's process), a blob of the same name here.
    Another stack of the same model on this machine has its own store."""
    try:
        mine = blob.stat()
    except OSError:
        return False
    try:
        theirs = os.stat(proc / str(pid) / "root" / model.lstrip("/"))
    except PermissionError:
        return True
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino)


def gpu_memory(config: Config, required: bool = True, stores: list[Path] | None = None) -> tuple[list[int], str]:
    """The memory of each GPU this stack may use, in bytes, and where that
    came from (([], "") when none is known and not `required`):
    plan.gpu_memory_gib, else what is free on each GPU now (what ollama
    itself plans from) plus what this stack's own runners hold (`stores`:
    its ollama stores on this machine)."""
    if config.plan.gpu_memory_gib:
        return [int(g * (1 << 30)) for g in config.plan.gpu_memory_gib], "plan.gpu_memory_gib"
    found = query_gpus()
    if not found and not required:
        return [], ""
    if not found:
        raise ConfigError(
            Problem("plan.gpu_memory_gib", "no GPU found (nvidia-smi is missing or sees none); give each GPU's memory, e.g. [24, 24]", None, config.source)
        )
    gpus = config.gpus
    if gpus.kind == "ids":
        wanted = set(gpus.ids)
        found = [g for g in found if str(g.index) in wanted]
    elif gpus.kind == "count":
        found = found[: gpus.count]
    own = own_gpu_use(stores or []) if found and any(g.free < g.total for g in found) else {}
    usable = [min(g.total, g.free + own.get(g.uuid, 0)) for g in found]
    return usable, free_memory_source(found, own)


def free_memory_source(found: list[Gpu], own: dict[str, int]) -> str:
    """How `gpu_memory` read the GPUs, for plan's output."""
    parts = []
    for g in found:
        others = g.total - g.free - own.get(g.uuid, 0)
        text = f"GPU {g.index} {g.free >> 20} of {g.total >> 20} MiB free"
        if own.get(g.uuid):
            text += f" + {own[g.uuid] >> 20} MiB this stack's runner holds"
        if others > 256 << 20:
            text += f" ({others >> 20} MiB held by other processes)"
        parts.append(text)
    return "nvidia-smi free memory, as ollama plans (" + "; ".join(parts) + "; plan.gpu_memory_gib overrides)"


@dataclass(frozen=True)
class SystemMemory:
    """RAM and swap a load can use, in bytes, and where each figure came from."""

    total: int
    available: int  # RAM a new process can have without swapping
    swap_free: int
    source: str  # e.g. "/proc/meminfo", "cgroup v2 limit 8.0 GiB"
    meminfo_available: int = 0  # what ollama itself reads (it knows no cgroup)
    cgroup_limit: int | None = None

    @property
    def usable(self) -> int:
        return self.available + self.swap_free


def _meminfo(root: Path) -> dict[str, int]:
    values = {}
    for line in (root / "proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return values


def _number(path: Path) -> int | None:
    """A cgroup file's number; None for `max`, a missing file or no limit."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    value = int(text)
    return None if value >= UNLIMITED else value


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if len(line.split()) == 2)}
    except (OSError, ValueError):
        return {}


def _cgroup_dirs(root: Path) -> tuple[str, list[Path]]:
    """The cgroup version and this process's memory cgroup folders, innermost
    first, up to the mount: each level's limit applies."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "", []
    v1 = next((line.split(":", 2)[2] for line in lines if line.count(":") >= 2 and "memory" in line.split(":", 2)[1].split(",")), None)
    if v1 is not None:
        mount, path = root / "sys/fs/cgroup/memory", v1
        version = "v1"
    else:
        path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
        if path is None:
            return "", []
        mount, version = root / "sys/fs/cgroup", "v2"
    # Inside a container with its own cgroup namespace the path is "/", and
    # the mount is the container's own cgroup; without one the path may not
    # exist under the mount: fall back to the mount's root.
    dirs = []
    relative = Path(path.lstrip("/"))
    for candidate in [relative, *relative.parents]:
        folder = mount / candidate
        if folder.is_dir():
            dirs.append(folder)
    return version, dirs


def read_system_memory(root: Path = Path("/"), cgroup: bool = True) -> SystemMemory:
    """RAM and swap for a process started here: /proc/meminfo, capped by this
    process's memory cgroup (unless `cgroup` is False: a container engine
    gives its containers their own limits)."""
    info = _meminfo(root)
    total = info.get("MemTotal", 0)
    # ollama's rule (discover/gpu_linux.go): MemAvailable, else free + buffers + cached
    available = info.get("MemAvailable") or info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
    swap = info.get("SwapFree", 0)
    meminfo_available = available
    source = "/proc/meminfo"
    limit_found = None
    if cgroup:
        version, dirs = _cgroup_dirs(root)
        for folder in dirs:
            if version == "v2":
                limit = _number(folder / "memory.max")
                usage = _number(folder / "memory.current")
                reclaimable = _stat(folder / "memory.stat").get("inactive_file", 0)
                swap_limit = _number(folder / "memory.swap.max")
                swap_used = _number(folder / "memory.swap.current") or 0
            else:
                limit = _number(folder / "memory.limit_in_bytes")
                usage = _number(folder / "memory.usage_in_bytes")
                reclaimable = _stat(folder / "memory.stat").get("total_inactive_file", 0)
                memsw = _number(folder / "memory.memsw.limit_in_bytes")
                swap_limit = memsw - limit if memsw is not None and limit is not None else None
                swap_used = 0
            if limit is None:
                continue
            room = max(0, limit - max(0, (usage or 0) - reclaimable))
            if limit_found is None or limit < limit_found:
                limit_found = limit
            if limit < total:
                total = limit
            if room < available:
                available = room
                source = f"cgroup {version} limit {limit / (1 << 30):.1f} GiB ({folder})"
            if swap_limit is not None:
                swap = min(swap, max(0, swap_limit - swap_used))
    return SystemMemory(total, available, swap, source, meminfo_available, limit_found)


@dataclass(frozen=True)
class FreeSpace:
    path: Path  # the folder asked about
    device: int  # st_dev of the nearest existing folder: places on one file system add up
    free: int


def free_space(path: Path) -> FreeSpace:
    """Free bytes where `path` is, or would be created."""
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    stats = os.statvfs(existing)
    return FreeSpace(path, os.stat(existing).st_dev, stats.f_bavail * stats.f_frsize)
