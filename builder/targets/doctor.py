"""`builder doctor`: one line per check (ok / warn / fail), each fail with its fix.

Every probe is small and fails soft: doctor reports, it never stops at the
first problem and never prints a traceback.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from builder.config import Config
from builder.render.blueprint import Blueprint

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix and self.status != OK else ""
        return f"{self.status:<4}  {self.name}: {self.detail}{fix}"

    def as_dict(self) -> dict:
        return asdict(self)


def check_engine():
    """The engine, through the same adapter every other command uses."""
    from builder.image.engine import DockerEngine
    from builder.errors import BuilderError

    try:
        engine = DockerEngine()
        info = engine.info()
    except BuilderError as exc:
        detail, _, fix = str(exc).removeprefix("cannot reach the Docker engine ").partition("; ")
        return Check("engine", FAIL, f"not reachable {detail}", fix), None, None
    return Check("engine", OK, f"Docker {info.get('ServerVersion')} ({info.get('Driver')}) reachable"), info, engine


def check_plugins(engine) -> list[Check]:
    out = []
    buildx = engine.plugin_version("buildx")
    if buildx:
        out.append(Check("buildx", OK, buildx))
    else:
        out.append(Check("buildx", WARN, "missing: builds fall back to the classic builder, which is not reproducible",
                         "install docker-buildx into ~/.docker/cli-plugins"))
    compose = engine.plugin_version("compose")
    if compose and compose.lstrip("v").startswith("2"):
        out.append(Check("compose", OK, f"Compose v{compose.lstrip('v')}"))
    else:
        out.append(Check("compose", FAIL, "Compose v2 (`docker compose`) is missing", "install the docker-compose v2 plugin"))
    return out


def check_gpus(config: Config, info: dict | None, toolkit: bool = True) -> list[Check]:
    if config.gpus.kind == "none":
        return [Check("gpu", OK, "not needed (gpus: none)")]
    out = []
    if not toolkit:  # the host target: ollama sees the GPUs directly
        return out + _gpu_list()
    runtimes = set((info or {}).get("Runtimes", {}) or {})
    cdi_specs = [p for d in ((info or {}).get("CDISpecDirs") or ["/etc/cdi", "/var/run/cdi"]) for p in Path(d).glob("*.yaml") if "nvidia" in p.name]
    if "nvidia" in runtimes or cdi_specs:
        how = "nvidia runtime" if "nvidia" in runtimes else f"CDI ({cdi_specs[0]})"
        out.append(Check("nvidia-toolkit", OK, f"configured: {how}"))
    else:
        out.append(Check("nvidia-toolkit", FAIL, "neither the nvidia runtime nor an NVIDIA CDI spec is configured",
                         "install nvidia-container-toolkit, then `nvidia-ctk runtime configure --runtime=docker` and restart dockerd"))
    return out + _gpu_list()


def _gpu_list() -> list[Check]:
    from builder.preflight.machine import query_gpus

    out = []
    gpus = query_gpus()
    if not gpus:
        out.append(Check("gpus", FAIL, "nvidia-smi is missing or sees no GPU", "install the NVIDIA driver (nvidia-smi must list the GPUs)"))
    else:
        listed = ", ".join(f"{g.index}: {g.name} {g.total / (1 << 30):.0f} GiB ({g.free / (1 << 30):.0f} GiB free)" for g in gpus)
        out.append(Check("gpus", OK, listed))
    return out


def check_storage(config: Config, blueprint: Blueprint) -> list[Check]:
    storage = config.storage
    if storage.kind == "local":
        if Path(storage.path).is_dir():
            return [Check("storage", OK, f"local folder {storage.path}")]
        return [Check("storage", FAIL, f"local folder {storage.path} does not exist", f"mkdir -p {storage.path} and put the shards there")]
    out = []
    port = nfs_port(storage.options)
    try:
        with socket.create_connection((storage.server, port), timeout=3):
            out.append(Check("nfs-server", OK, f"{storage.server}:{port} answers"))
    except OSError as exc:
        out.append(Check("nfs-server", FAIL, f"{storage.server}:{port} does not answer ({exc.strerror or exc})",
                         f"check storage.nfs.server, the server's nfsd and the firewall (TCP {port})"))
    if _kernel_has_nfs():
        out.append(Check("nfs-client", WARN, f"cannot test-mount {storage.server}:{storage.export} from here; the first `up` will",
                         "mount it by hand once: mount -t nfs -o " + storage.options + f" {storage.server}:{storage.export} /mnt"))
    else:
        out.append(Check("nfs-client", FAIL, "this kernel has no NFS client, so Docker cannot mount the volume",
                         "install nfs-common and load the nfs module (modprobe nfs), or use storage.local"))
    return out


def nfs_port(options: str) -> int:
    """The TCP port the mount will use: the `port=N` mount option, else NFS's 2049."""
    for item in options.split(","):
        key, _, value = item.partition("=")
        if key.strip() == "port" and value.strip().isdigit() and 0 < int(value) < 65536:
            return int(value)
    return 2049


def _kernel_has_nfs() -> bool:
    try:
        if "nfs" in Path("/proc/filesystems").read_text():
            return True
    except OSError:
        pass
    release = os.uname().release
    return any(Path(f"/lib/modules/{release}/kernel/fs/{name}").exists() for name in ("nfs", "nfs_common"))


def check_shards(config: Config) -> list[Check]:
    """The shards, the space the merge or create needs, the RAM the load
    needs: from one read of the headers (the preflight)."""
    from builder.errors import ConfigError
    from builder.preflight import assess

    try:
        preflight = assess(config, cgroup=config.target == "host")
    except ConfigError as exc:
        return [Check("shards", FAIL, str(exc).split(": ", 1)[-1], "copy the shard(s) again from the source")]
    facts = preflight.facts
    if facts is None:
        return [Check("shards", WARN, "on NFS, not readable from here", "mount the export and set plan.shards_dir to check the shards")]
    return [
        Check("shards", OK, f"{len(facts.names)} shard(s) in {facts.folder}, {_size(facts.file_bytes)}, intact (sizes match their headers)"),
        check_model_space(config, facts),
        check_ram(preflight),
    ]


def _size(size: int) -> str:
    from builder.supervisor.common import human_bytes

    return human_bytes(size)


def check_model_space(config: Config, facts) -> Check:
    """Free space on the model storage for the merge (0.5.7) or create's rewrite (0.30+)."""
    from builder.supervisor.common import CURRENT

    place = Path(config.storage.model_cache) if config.storage.model_cache else facts.folder
    while not place.exists() and place != place.parent:  # a model cache up has not made yet: the disk it will be on
        place = place.parent
    total, free = facts.file_bytes, os.statvfs(place).f_bavail * os.statvfs(place).f_frsize
    if config.ollama_generation == CURRENT:
        # No merge; create writes the model twice into ollama's store before deleting one copy.
        from builder.supervisor.create import created_summary
        from builder.supervisor.create_shards import MARGIN

        need = (3 if config.storage.model_cache else 2) * total + MARGIN  # a cache on another disk: the shards copied in too
        what = f"{_size(free)} free, ollama {config.ollama.version}'s create needs {_size(need)} at its peak (no merge)"
        store = Path(config.storage.model_cache or config.storage.path) / "ollama"
        if (config.storage.kind == "local" or config.storage.model_cache) and created_summary(str(store), config.model.name):
            return Check("space", OK, f"{_size(free)} free; {config.model.name} is already created")
        if free >= need:
            return Check("space", OK, what)
        return Check("space", FAIL, what, f"free {_size(need - free)} in {place}, or use ollama.version 0.5.7 (its merge writes one copy, its create none)")
    if facts.merged_present or not config.model.shards.count:
        return Check("space", OK, f"{_size(free)} free; the merged file is already there")
    if free >= total:
        return Check("space", OK, f"{_size(free)} free, the merge needs {_size(total)}")
    return Check("space", FAIL, f"{_size(free)} free in {place}, the merge needs {_size(total)}", f"free {_size(total - free)} in {place}")


def check_ram(preflight) -> Check:
    """The RAM and swap the part of the model off the GPUs needs, beside what a load here gets."""
    line = preflight.ram_line()
    if preflight.fits_in_ram:
        return Check("ram", OK, line)
    return Check("ram", FAIL, line, "put more layers on the GPUs (model.parameters.num_gpu), add RAM or swap, or raise the memory limit")


def check_read_rates(config: Config, seconds: float = 3.0) -> list[Check]:
    """How fast the model volume and the model cache read (a few seconds
    each), and how long a full read of the model takes from each: every
    load without a model cache reads the volume again."""
    from builder.preflight import where
    from builder.preflight.model import shard_folder

    cache = config.storage.model_cache
    volume = shard_folder(config)
    if volume is not None and not volume.is_dir() and config.storage.kind == "local" and not config.plan.shards_dir:
        volume = Path(config.storage.path)
    out = []
    if volume is None:
        out.append(Check("read-rate", WARN, f"model volume {config.storage.server}:{config.storage.export}: cannot measure it from here (NFS)",
                         "mount the export here and set plan.shards_dir to where it is mounted"))
        size = None
    else:
        size = where.model_bytes_here(config)
        out.append(_rate_check(config, "model volume", volume, size, seconds, slow_fix=None if cache else
                               "set storage.model_cache to a folder on this machine's local disk (README: Model cache)"))
    if cache and not Path(cache).exists():
        out.append(Check("read-rate", OK, f"model cache {cache}: not made yet (`builder up` makes it)"))
    elif cache:
        out.append(_rate_check(config, "model cache", Path(cache), size, seconds, slow_fix=None))
    return out


def _rate_check(config: Config, what: str, place: Path, size: int | None, seconds: float, slow_fix: str | None) -> Check:
    """One read-rate line; a warn with `slow_fix` when a full read of the model takes over SLOW_LOAD_S."""
    from builder.preflight import where
    from builder.preflight.readrate import load_seconds, measure
    from builder.targets.status import remember_rate

    try:
        rate = measure(place, seconds=seconds, what=what)
        remember_rate(config, rate)  # for plan and status, which only read
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else (exc.strerror or str(exc))
        return Check("read-rate", WARN, f"{what} {place}: cannot measure ({reason})", f"check that {place} exists and can be read")
    if size is None:
        return Check("read-rate", OK, rate.line())
    took = load_seconds(size, rate)
    detail = f"{rate.line()}; a {where.decimal_size(size)} model reads in {_duration(took)}"
    if slow_fix and took > where.SLOW_LOAD_S:
        return Check("read-rate", WARN, f"{detail}, at every load", slow_fix)
    return Check("read-rate", OK, detail)


def _duration(seconds: float) -> str:
    from builder.preflight.where import duration

    return "forever (nothing was read)" if seconds == float("inf") else duration(seconds)


def check_image(blueprint: Blueprint, lock_sha256: str | None, engine) -> Check:
    if engine is None:
        return Check("image", WARN, "not checked (no engine)")
    from builder.image.build import image_staleness

    reason = image_staleness(blueprint, engine.image_labels(blueprint.image), lock_sha256)
    if reason:
        return Check("image", WARN, reason, "builder build (or builder up, which builds it)")
    return Check("image", OK, f"{blueprint.image} is built from this config, builder and lock")


def check_host(config: Config) -> list[Check]:
    """What the host target needs of this machine: a Python for the
    supervisor, a prefix it can write, the storage as a real mount."""
    import sys

    from builder.targets.host import _prefix

    out = []
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info >= (3, 10):
        out.append(Check("python", OK, f"Python {version} runs the supervisor"))
    else:
        out.append(Check("python", FAIL, f"Python {version} is too old", "install Python 3.10 or newer (see the README's AutoDL steps)"))
    prefix = _prefix(config.project, config)
    parent = next((p for p in [prefix, *prefix.parents] if p.exists()), Path("/"))
    if os.access(parent, os.W_OK):
        out.append(Check("prefix", OK, f"{prefix} is writable (releases, supervisor, pid file, log)"))
    else:
        out.append(Check("prefix", FAIL, f"{prefix} cannot be written here", "set host.prefix to a folder you can write"))
    if config.storage.kind == "nfs":
        out.append(Check("storage", FAIL, "the host target reads the model from a folder", "mount the NFS export and set storage.local to it"))
        return out
    storage = Path(config.storage.path)
    if not storage.is_dir():
        out.append(Check("storage", FAIL, f"{storage} does not exist", f"mkdir -p {storage} and put the shards there"))
    else:
        mount = next(p for p in [storage, *storage.parents] if os.path.ismount(p))
        where = "its own mount" if mount == storage else f"on the mount {mount}"
        out.append(Check("storage", OK if mount != Path("/") else WARN, f"{storage} is {where}",
                         "the root filesystem of a rented container is often small and lost on restart: use the data disk"))
    return out


def run_checks(config: Config, blueprint: Blueprint, lock_sha256: str | None) -> list[Check]:
    if config.target == "host":
        return check_host(config) + check_gpus(config, None, toolkit=False) + check_shards(config) + check_read_rates(config)
    check, info, engine = check_engine()
    checks = [check]
    if engine is not None:
        checks += check_plugins(engine)
    checks += check_gpus(config, info)
    checks += check_storage(config, blueprint)
    checks += check_shards(config)
    checks += check_read_rates(config)
    checks.append(check_image(blueprint, lock_sha256, engine))
    return checks
