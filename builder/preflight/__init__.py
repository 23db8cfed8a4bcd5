"""The preflight: one stage between the config and everything that writes.

    Config --read_model--> ModelFacts --assess--> Preflight

`read_model` reads every shard's header once (preflight.model); `assess`
takes those facts and this machine's (preflight.machine: GPUs, RAM, swap)
and returns one value with the config completed (`num_gpu: auto` resolved),
the offload plan's inputs and the RAM the plan needs; the checks below take
that value and refuse in one line. Nothing after the preflight opens a shard
or asks the machine again. Disk space is checked where the bytes are known,
before each fetch and build (preflight.disk).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from builder.config import Config
from builder.errors import ConfigError, Problem
from builder.preflight.machine import SystemMemory, gpu_memory, read_system_memory
from builder.preflight.model import ModelFacts, read_model, shard_folder, shard_names  # noqa: F401 - the stage's names
from builder.preflight.sizing import GIB, RamNeed, num_gpu_warning, plan_for, ram_need, resolve_num_gpu

DEFAULT_K8S_MEMORY = "256Gi"  # when the shards cannot be read at render time


@dataclass(frozen=True)
class Preflight:
    """What the preflight learnt: the completed config and the facts the checks, the plan and the render use."""

    config: Config  # num_gpu: auto resolved to a number where it was asked for
    facts: ModelFacts | None  # None: the shards cannot be read from here
    gpu_memory: tuple[int, ...] = ()
    gpu_source: str = ""
    ram: RamNeed | None = None
    system: SystemMemory | None = None
    notes: tuple[str, ...] = ()  # e.g. how num_gpu: auto was resolved

    @property
    def fits_in_ram(self) -> bool | None:
        if self.ram is None or self.system is None:
            return None
        return self.ram.total <= self.system.usable

    def ram_line(self) -> str | None:
        """`plan`'s and doctor's line: what the load needs beside what the machine has."""
        if self.ram is None or self.system is None:
            return None
        system, need = self.system, self.ram
        verdict = "fits" if self.fits_in_ram else "does NOT fit"
        return (f"needs {need.total / GIB:.1f} GiB off the GPUs with num_gpu {need.num_gpu} ({need.terms()}); "
                f"has {system.available / GIB:.1f} GiB RAM + {system.swap_free / GIB:.1f} GiB swap ({system.source}): {verdict}")

    def memory_limit(self, setting: str) -> str | None:
        """A container memory limit from a `memory_limit` setting: auto is the
        plan's RAM need plus sizing.LIMIT_MARGIN when the shards were read."""
        if setting == "none":
            return None
        if setting != "auto":
            return setting
        if self.ram is None:
            return None
        return f"{self.ram.limit() // GIB}Gi"


def assess(config: Config, folder: Path | None = None, whole: bool = True, system: SystemMemory | None = None,
           cgroup: bool = True, gpus_required: bool = False, lenient: bool = False) -> Preflight:
    """Read the model once and size it for this machine: `whole` shards
    (validate, up, doctor) or headers only (`plan`); the RAM this process's
    cgroup allows (`cgroup`, for the host target) or the machine's. Raises
    ConfigError for a model that cannot be read, loaded or planned; with
    `lenient` (render, status) shards that cannot be read are no facts,
    unless num_gpu: auto needs them. An explicit num_gpu above the plan is
    a warning in `notes` (the load decides), never a refusal."""
    parameters = dict(config.model.parameters)
    try:
        facts = read_model(config, folder, whole)
    except ConfigError:
        if not lenient or parameters.get("num_gpu") == "auto":
            raise
        facts = None
    needs_gpus = (gpus_required or parameters.get("num_gpu") == "auto") and config.gpus.kind != "none" and facts is not None
    memory, source = gpu_memory(config, required=needs_gpus, stores=local_stores(config)) if config.gpus.kind != "none" else ([], "gpus: none")
    config, reason = resolve_num_gpu(config, facts, memory, source)
    if facts is None:
        return Preflight(config, None, tuple(memory), source, notes=tuple(filter(None, [reason])))
    warning = num_gpu_warning(config, facts, memory, source)
    num_gpu = dict(config.model.parameters).get("num_gpu")
    if not isinstance(num_gpu, int) or isinstance(num_gpu, bool):
        num_gpu = plan_for(config, facts.shape, memory).num_gpu if memory else 0  # ollama's own estimate, as planned
    need = ram_need(config, facts.shape, num_gpu, memory)
    if system is None:
        system = planned_ram(config) or read_system_memory(cgroup=cgroup)
    return Preflight(config, facts, tuple(memory), source, need, system, tuple(filter(None, [reason, warning])))


def local_stores(config: Config) -> list[Path]:
    """Where this stack's ollama store is on this machine, if anywhere (the
    model cache, a local model volume): its runners are told apart by their
    blobs."""
    from builder.render.blueprint import MODELS_DIR, OLLAMA_STORE

    store = Path(OLLAMA_STORE).relative_to(MODELS_DIR)
    places = [config.storage.model_cache, config.storage.path if config.storage.kind == "local" else None]
    return [Path(place) / store for place in places if place]


def planned_ram(config: Config) -> SystemMemory | None:
    """plan.ram_gib, when the config says what the serving machine has."""
    if not config.plan.ram_gib:
        return None
    size = int(config.plan.ram_gib * GIB)
    return SystemMemory(size, size, 0, "plan.ram_gib", size)


def check_ram(preflight: Preflight) -> None:
    """Refuse a plan whose off-GPU part does not fit the RAM and swap a load can use, with the numbers and the fixes."""
    if preflight.fits_in_ram is not False:
        return
    config, need, system = preflight.config, preflight.ram, preflight.system
    assert need is not None and system is not None
    more_gpu = "" if config.gpus.kind == "none" or need.cpu_layers == 0 else "more layers on the GPUs (model.parameters.num_gpu, larger GPUs), "
    raise ConfigError(Problem(
        "model.parameters.num_gpu",
        f"the part of {config.model.name} that stays off the GPUs needs {need.total / GIB:.1f} GiB of RAM ({need.terms()}) but "
        f"{system.available / GIB:.1f} GiB RAM + {system.swap_free / GIB:.1f} GiB swap are free here ({system.source}); "
        f"fix: {more_gpu}more RAM (a larger memory limit), {(need.total - system.usable) / GIB:.1f} GiB more swap, "
        "or a smaller quant (plan.ram_gib overrides what is read here)",
        None, config.source,
    ))


def blueprint_for(preflight: Preflight):
    """The render plan of the completed config, with the memory limits the preflight derived."""
    from builder.render.blueprint import make_blueprint

    config = preflight.config
    return make_blueprint(config, preflight.memory_limit(config.serve.memory_limit), preflight.memory_limit(config.kubernetes.memory_limit))


def with_gpu_memory(config: Config, gpu_memory_gib: tuple[float, ...] | None) -> Config:
    """The config with --gpu-memory in place of plan.gpu_memory_gib."""
    if not gpu_memory_gib:
        return config
    return dataclasses.replace(config, plan=dataclasses.replace(config.plan, gpu_memory_gib=gpu_memory_gib))
