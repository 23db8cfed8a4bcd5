"""Checks of the world outside the config file: the shards on disk, the GPUs."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from builder.config import Config
from builder.errors import ConfigError, Problem
from builder.supervisor.common import CURRENT, LEGACY
from builder.supervisor.gguf import GGUFError, GGUFHeader, read_header_file
from builder.supervisor.shards import shard_file_names

if TYPE_CHECKING:
    from builder.render.offload import ModelShape, OffloadPlan


def shard_names(config: Config) -> list[str]:
    shards = config.model.shards
    return shard_file_names(shards.prefix, shards.count) if shards.count else [PurePosixPath(shards.first).name]


def shard_folder(config: Config) -> Path | None:
    """Where this machine can read the shards: plan.shards_dir, else local storage."""
    if config.plan.shards_dir:
        return Path(config.plan.shards_dir)
    if config.storage.kind == "local":
        return Path(config.storage.path) / config.model.shards.folder
    return None


def check_local_shards(config: Config) -> Path | None:
    """Where the shards can be read here (local storage, plan.shards_dir):
    every shard is present, parses, is as long as its header says and belongs
    to this split, and the model is one ollama can load, exactly as the merge
    will check them, but before anything is built or started. The merged
    file, if there, must be a whole GGUF file. Returns the folder checked, or
    None when the shards cannot be read from here."""
    folder = shard_folder(config)
    if folder is None:
        return None
    names = shard_names(config)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError(
            Problem(
                "model.shards",
                f"{len(missing)} of {len(names)} shard(s) missing in {folder}: {listed}; copy them there and run again",
                None,
                config.source,
            )
        )
    from builder.supervisor.common import StepError
    from builder.supervisor.gguf import check_file
    from builder.supervisor.loadable import NotLoadable, check_loadable
    from builder.supervisor.merge import check_shards, shard_states

    count = config.model.shards.count
    try:
        if count:
            headers, _ = check_shards(str(folder), shard_states(str(folder), names), count)
        else:
            headers = [check_file(str(folder / names[0]), (folder / names[0]).stat().st_size)]
        check_loadable([(str(folder / name), header) for name, header in zip(names, headers)], config.ollama_generation)
    except StepError as exc:
        raise ConfigError(Problem("model.shards", str(exc).removeprefix("merge: "), None, config.source)) from None
    except GGUFError as exc:
        raise ConfigError(Problem("model.shards", f"{folder / names[0]} {exc}", None, config.source)) from None
    except NotLoadable as exc:
        raise ConfigError(Problem("model.shards", str(exc), None, config.source)) from None
    merged = folder / PurePosixPath(config.model.merged).name
    if count and merged.is_file() and config.ollama_generation == LEGACY:  # 0.30+ never reads it
        try:
            check_file(str(merged), merged.stat().st_size)
        except GGUFError as exc:
            raise ConfigError(
                Problem("model.merged", f"{merged} {exc}; delete it and `builder up` merges again", None, config.source)
            ) from None
    return folder


def read_shard_headers(config: Config, folder: Path | None = None) -> list[GGUFHeader]:
    """The GGUF header of every shard (never the tensor data)."""
    folder = folder or shard_folder(config)
    if folder is None:
        raise ConfigError(
            Problem("plan.shards_dir", "the shards are on NFS: mount the export here and set plan.shards_dir (or pass --shards DIR)", None, config.source)
        )
    headers = []
    for name in shard_names(config):
        path = folder / name
        try:
            headers.append(read_header_file(str(path)))
        except FileNotFoundError:
            raise ConfigError(Problem("model.shards", f"{path} is missing; the plan needs every shard's header", None, config.source)) from None
        except (GGUFError, OSError) as exc:
            raise ConfigError(Problem("model.shards", f"{path} {exc}", None, config.source)) from None
    from builder.supervisor.loadable import NotLoadable, check_loadable

    try:
        check_loadable([(str(folder / name), header) for name, header in zip(shard_names(config), headers)], config.ollama_generation)
    except NotLoadable as exc:
        raise ConfigError(Problem("model.shards", str(exc), None, config.source)) from None
    return headers


def query_gpus() -> list[tuple[int, str, int]] | None:
    """(index, name, memory bytes) of each GPU nvidia-smi sees; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=30,
    )
    if result.returncode != 0:
        return None
    gpus = []
    for line in result.stdout.strip().splitlines():
        index, name, memory = (part.strip() for part in line.split(","))
        gpus.append((int(index), name, int(float(memory)) << 20))
    return gpus


def gpu_memory(config: Config, required: bool = True) -> tuple[list[int], str]:
    """Each GPU's memory in bytes, and where that came from (([], "") when
    none is known and not `required`)."""
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
        found = [g for g in found if str(g[0]) in wanted]
    elif gpus.kind == "count":
        found = found[: gpus.count]
    return [g[2] for g in found], "nvidia-smi"


def effective_parallel(config: Config, model_bytes: int) -> tuple[int, str]:
    """The sequences ollama will run: serve.env's OLLAMA_NUM_PARALLEL, else the
    rule the supervisor applies (builder.supervisor.limits)."""
    from builder.supervisor.limits import parallel_sequences

    env = dict(config.serve.env)
    if "OLLAMA_NUM_PARALLEL" in env:
        try:
            return max(1, int(env["OLLAMA_NUM_PARALLEL"])), "serve.env.OLLAMA_NUM_PARALLEL"
        except ValueError:
            raise ConfigError(Problem("serve.env.OLLAMA_NUM_PARALLEL", f"'{env['OLLAMA_NUM_PARALLEL']}' is not a whole number", None, config.source)) from None
    return parallel_sequences(model_bytes, config.serve.limits()["parallel"]), "serve.parallel"


def sched_spread(config: Config) -> bool:
    """OLLAMA_SCHED_SPREAD from serve.env, read as ollama's envconfig.Bool
    does: any value but an empty or false one (strconv.ParseBool) is true."""
    value = str(dict(config.serve.env).get("OLLAMA_SCHED_SPREAD", ""))
    return value not in ("", "0", "f", "F", "false", "False", "FALSE")


def default_num_ctx(config: Config, memory: list[int]) -> int:
    """The context ollama gives the model: model.parameters.num_ctx, else
    ollama's default: 2048 for 0.5.7; for 0.30+ a tier of the GPUs' total
    memory (v0.32.15 server/routes.go: 262144 from 47 GiB, 32768 from 23 GiB,
    else 4096)."""
    parameters = dict(config.model.parameters)
    if "num_ctx" in parameters:
        return int(parameters["num_ctx"])
    if config.ollama_generation != CURRENT:
        return 2048
    total = sum(memory)
    return 262144 if total >= 47 << 30 else 32768 if total >= 23 << 30 else 4096


def plan_for(config: Config, shape: ModelShape, memory: list[int], num_ctx: int | None = None) -> OffloadPlan:
    """render.offload.plan_offload with what the config says about the
    context, the sequences, the batch and ollama's scheduler."""
    from builder.render.offload import GIB, N_UBATCH, plan_offload

    parameters = dict(config.model.parameters)
    ctx = num_ctx or default_num_ctx(config, memory)
    parallel, _ = effective_parallel(config, shape.total_bytes)
    # ollama gives the runner num_batch x parallel (runner.go); llama.cpp's ubatch is at most 512 of it
    batch = min(N_UBATCH, int(parameters.get("num_batch", N_UBATCH)) * parallel)
    return plan_offload(shape, memory, ctx, int(config.plan.margin_gib * GIB), parallel, batch, sched_spread(config))


def check_parallel(config: Config) -> None:
    """A parallelism that leaves no room for the layers model.parameters.num_gpu
    puts on the GPUs is a config error, with the numbers. Checked where the
    shards can be read and the GPUs' memory is known."""
    parameters = dict(config.model.parameters)
    num_gpu = parameters.get("num_gpu")
    if not isinstance(num_gpu, int) or isinstance(num_gpu, bool) or num_gpu == 0 or config.gpus.kind == "none":
        return
    if shard_folder(config) is None:
        return
    memory, source = gpu_memory(config, required=False)
    if not memory:
        return
    from builder.render.offload import GIB, model_shape

    shape = model_shape(read_shard_headers(config))
    parallel, where = effective_parallel(config, shape.total_bytes)
    num_ctx = default_num_ctx(config, memory)
    planned = plan_for(config, shape, memory)
    if planned.num_gpu < num_gpu:
        sizes = " + ".join(f"{m / GIB:g}" for m in memory)
        raise ConfigError(Problem(
            where if where.startswith("serve.env") else "serve.parallel",
            f"{parallel} parallel sequences make the KV cache num_ctx {num_ctx} x {parallel}: only {planned.num_gpu} layers fit "
            f"on the GPUs ({sizes} GiB, from {source}) but model.parameters.num_gpu is {num_gpu}; "
            f"lower OLLAMA_NUM_PARALLEL (serve.env or serve.parallel) or set num_gpu to {planned.num_gpu}",
            None, config.source,
        ))


def resolve_num_gpu(config: Config) -> tuple[Config, str | None]:
    """Replace `num_gpu: auto` with the planned number; say why."""
    parameters = dict(config.model.parameters)
    if parameters.get("num_gpu") != "auto":
        return config, None
    from builder.render.offload import model_shape

    if config.gpus.kind == "none":
        number, reason = 0, "num_gpu: auto -> 0 (gpus: none)"
    else:
        memory, source = gpu_memory(config)
        shape = model_shape(read_shard_headers(config))
        plan = plan_for(config, shape, memory)
        number, reason = plan.num_gpu, f"num_gpu: auto -> {plan.summary()}; memory from {source}"
    parameters["num_gpu"] = number
    model = dataclasses.replace(config.model, parameters=tuple(sorted(parameters.items())))
    return dataclasses.replace(config, model=model), reason


@dataclasses.dataclass(frozen=True)
class OffloadReport:
    """What `builder plan` shows: the placement, the model, ollama's limits."""

    result: object  # render.offload.OffloadPlan
    shape: object  # render.offload.ModelShape
    source: str
    limits: dict[str, str]
    explained: list[str]
    set_by_user: frozenset[str]
    caveat: str = ""

    def as_dict(self) -> dict:
        shape = self.shape
        data = self.result.as_dict()
        data["model"] = {
            "architecture": shape.architecture,
            "blocks": shape.block_count,
            "total_bytes": shape.total_bytes,
            "block_bytes": list(shape.block_bytes),
            "output_bytes": shape.output_bytes,
            "cpu_bytes": shape.cpu_bytes,
        }
        data["gpu_memory_source"] = self.source
        data["ollama_env"] = self.limits
        return data

    def lines(self) -> list[str]:
        from builder.render.offload import GIB, MIB

        shape, result = self.shape, self.result
        out = [f"model   {shape.architecture}, {shape.block_count} layers, {shape.total_bytes / GIB:.1f} GiB"]
        for gpu in result.gpus:
            if gpu.position is None:
                out.append(f"gpu {gpu.index}   unused: ollama runs num_gpu {result.num_gpu} without it ({gpu.memory / MIB:.0f} MiB)")
                continue
            layers = f"{gpu.blocks[0]}-{gpu.blocks[-1]}" if gpu.blocks else "none"
            # the terms llama.cpp logs (model, KV, compute buffer) and the peak nvidia-smi shows, in MiB
            out.append(
                f"gpu {gpu.index}   layers {layers} ({len(gpu.blocks)}): model {gpu.weights / MIB:.0f} + KV {gpu.kv_cache / MIB:.0f} "
                f"+ compute {gpu.compute / MIB:.0f} ({gpu.compute_point}) + CUDA {gpu.overhead / MIB:.0f} "
                f"= peak {gpu.used / MIB:.0f} of {gpu.memory / MIB:.0f} MiB (CUDA{gpu.position})"
            )
        out += [result.summary(), f"memory from {self.source}"] + ([self.caveat] if self.caveat else [])
        for line in self.explained:
            name = line.split("=", 1)[0]
            out.append(f"ollama  {name}={self.limits[name]}: serve.env" if name in self.set_by_user else f"ollama  {line}")
        return out


def offload_report(config: Config, shards_dir: Path | None, gpu_memory_gib: tuple[float, ...] | None, num_ctx: int | None) -> OffloadReport:
    """`builder plan`: read the headers, place the layers, size ollama's limits."""
    from builder.render.offload import model_shape
    from builder.supervisor.limits import explain, ollama_limits

    if gpu_memory_gib:
        config = dataclasses.replace(config, plan=dataclasses.replace(config.plan, gpu_memory_gib=gpu_memory_gib))
    memory, source = gpu_memory(config)
    shape = model_shape(read_shard_headers(config, shards_dir))
    result = plan_for(config, shape, memory, num_ctx)
    limits = ollama_limits(shape.total_bytes, config.serve.limits())
    limits.update({k: v for k, v in config.serve.env if k in limits})
    caveat = ""
    if config.ollama_generation == CURRENT:
        caveat = (f"note    ollama {config.ollama.version} runs a newer llama-server, which splits the layers by the GPUs' free "
                  "memory: planned with ollama 0.5.7's split and llama.cpp b4610's buffers (the same for equal GPUs; not measured)"
                  + ("" if "num_ctx" in dict(config.model.parameters) else f"; num_ctx is ollama's default for {sum(memory) / (1 << 30):.0f} GiB of GPUs: {result.num_ctx}"))
    return OffloadReport(result, shape, source, limits, explain(shape.total_bytes, config.serve.limits()),
                         frozenset(k for k, _ in config.serve.env), caveat)
