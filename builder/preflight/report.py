"""What `builder plan` shows: the placement, the model, ollama's limits, and
the RAM the part off the GPUs needs beside what the machine has."""

from __future__ import annotations

import dataclasses

from builder.errors import ConfigError, Problem
from builder.preflight import Preflight
from builder.preflight.sizing import plan_for
from builder.supervisor.common import CURRENT


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
    ram: str | None = None  # Preflight.ram_line()
    ram_rule: str = ""
    ram_needed: dict | None = None
    reads: dict | None = None  # where loads read the model from (preflight.where.reads)
    read_lines: tuple[str, ...] = ()

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
        if self.ram_needed is not None:
            data["ram"] = self.ram_needed
        if self.reads is not None:
            data["reads"] = self.reads
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
        out += [result.summary()] + ([f"memory from {self.source}"] if result.gpus else []) + ([self.caveat] if self.caveat else [])
        if self.ram:
            out += [f"ram     {self.ram}", f"ram     {self.ram_rule}"]
        out += list(self.read_lines)
        for line in self.explained:
            name = line.split("=", 1)[0]
            out.append(f"ollama  {name}={self.limits[name]}: serve.env" if name in self.set_by_user else f"ollama  {line}")
        return out


def offload_report(preflight: Preflight, num_ctx: int | None) -> OffloadReport:
    """`builder plan`: place the layers, size ollama's limits and the RAM."""
    from builder.preflight.sizing import GIB
    from builder.supervisor.limits import explain, ollama_limits

    config, facts = preflight.config, preflight.facts
    if facts is None:
        raise ConfigError(Problem("plan.shards_dir", "the shards are on NFS: mount the export here and set plan.shards_dir (or pass --shards DIR)",
                                  None, config.source))
    memory, shape = list(preflight.gpu_memory), facts.shape
    result = plan_for(config, shape, memory, num_ctx)
    limits = ollama_limits(shape.total_bytes, config.serve.limits())
    limits.update({k: v for k, v in config.serve.env if k in limits})
    caveat = ""
    if config.ollama_generation == CURRENT:
        caveat = (f"note    ollama {config.ollama.version} runs a newer llama-server: planned with ollama 0.5.7's split and "
                  "llama.cpp b4610's buffers, which err on the safe side there (on one H100 with 0.32.15 the plan loaded and so did "
                  "one layer more: llama-server puts the output layer on the GPU first, so num_gpu N holds N-1 blocks and the "
                  "head); with several GPUs it splits by their free memory (not measured)"
                  + ("" if "num_ctx" in dict(config.model.parameters) else f"; num_ctx is ollama's default for {sum(memory) / (1 << 30):.0f} GiB of GPUs: {result.num_ctx}"))
    ram = preflight.ram
    needed = None if ram is None or preflight.system is None else {
        "num_gpu": ram.num_gpu, "cpu_layers": ram.cpu_layers, "weights_bytes": ram.weights, "kv_cache_bytes": ram.kv_cache,
        "compute_bytes": ram.compute, "allowance_bytes": ram.allowance, "needed_bytes": ram.total,
        "available_bytes": preflight.system.available, "swap_free_bytes": preflight.system.swap_free,
        "source": preflight.system.source, "fits": preflight.fits_in_ram, "memory_limit": preflight.memory_limit("auto"),
    }
    rule = ("ollama 0.5.7 itself refuses only above MemAvailable + SwapFree of /proc/meminfo (no cgroup) for the CPU layers' "
            f"weights and KV ({(ram.weights - shape.cpu_bytes + ram.kv_cache) / GIB:.1f} GiB): a smaller cgroup limit is an OOM kill instead"
            if config.ollama_generation != CURRENT else
            f"ollama {config.ollama.version} has no RAM check of its own: llama-server allocates, and a smaller cgroup limit is an OOM kill") if ram else ""
    from builder.preflight.where import read_lines, reads

    return OffloadReport(result, shape, preflight.gpu_source, limits, explain(shape.total_bytes, config.serve.limits()),
                         frozenset(k for k, _ in config.serve.env), caveat, preflight.ram_line(), rule, needed,
                         reads(config, facts.file_bytes), tuple(read_lines(config, facts.file_bytes)))


def parse_gpu_memory(text: str | None) -> tuple[float, ...] | None:
    """--gpu-memory: GiB per GPU, comma-separated."""
    if not text:
        return None
    try:
        sizes = tuple(float(part) for part in text.split(","))
        if any(size <= 0 for size in sizes):
            raise ValueError
    except ValueError:
        raise ConfigError(f"--gpu-memory: expected GiB per GPU like 24,24, got {text!r}") from None
    return sizes
