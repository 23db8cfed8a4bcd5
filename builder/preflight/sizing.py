"""Sizing from the model's facts: the sequences and context ollama will run,
the layers that fit on the GPUs (render.offload), and the RAM the part of
the model that stays off the GPUs needs. Pure: every input is a value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from builder.config import Config
from builder.errors import ConfigError, Problem
from builder.supervisor.common import CURRENT

if TYPE_CHECKING:
    from builder.preflight.model import ModelFacts
    from builder.render.offload import ModelShape, OffloadPlan

GIB = 1 << 30
# ollama's server and its runner beside the buffers llama.cpp logs (Go heap,
# the runner's code and libraries, CUDA's host-side state): a stated
# allowance, not a measurement.
PROCESS_ALLOWANCE = 1 * GIB
# What a derived memory limit (compose's mem_limit, Kubernetes' limit) adds to
# the RAM the plan needs: room for the page cache the load streams through
# and for a request's buffers, so the kernel reclaims instead of killing.
LIMIT_MARGIN = 2 * GIB


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


def num_gpu_warning(config: Config, facts: ModelFacts, memory: list[int], source: str) -> str | None:
    """An explicit model.parameters.num_gpu above the plan: a warning with the
    numbers, not a refusal. The plan is an estimate; a number the user has
    seen load is theirs to keep, and ollama's load is the judge (an
    out-of-memory there is `up`'s error, with the advice)."""
    from builder.render.offload import GIB

    num_gpu = dict(config.model.parameters).get("num_gpu")
    if config.num_gpu_planned or not isinstance(num_gpu, int) or isinstance(num_gpu, bool) or num_gpu == 0:
        return None
    if config.gpus.kind == "none" or not memory:
        return None
    parallel, where = effective_parallel(config, facts.shape.total_bytes)
    num_ctx = default_num_ctx(config, memory)
    planned = plan_for(config, facts.shape, memory)
    if planned.num_gpu >= num_gpu:
        return None
    sizes = " + ".join(f"{m / GIB:g}" for m in memory)
    kv = f"num_ctx {num_ctx} x {parallel} parallel sequences ({where})" if parallel > 1 else f"num_ctx {num_ctx}"
    fewer = f"lower OLLAMA_NUM_PARALLEL (serve.parallel) or num_gpu to {planned.num_gpu}" if parallel > 1 else f"set num_gpu to {planned.num_gpu}"
    return (f"warning: model.parameters.num_gpu: {num_gpu} layers, but the plan fits {planned.num_gpu} on the GPUs "
            f"({sizes} GiB, from {source}; KV cache for {kv}); the load decides: if ollama runs out of GPU memory, "
            f"`up` says so and leaves serve up; then {fewer}")


def resolve_num_gpu(config: Config, facts: ModelFacts | None, memory: list[int], source: str) -> tuple[Config, str | None]:
    """Replace `num_gpu: auto` with the planned number; say why."""
    parameters = dict(config.model.parameters)
    if parameters.get("num_gpu") != "auto":
        return config, None
    if config.gpus.kind == "none":
        number, reason = 0, "num_gpu: auto -> 0 (gpus: none)"
    else:
        if facts is None:
            raise ConfigError(Problem(
                "plan.shards_dir", "num_gpu: auto needs the shards' headers: mount the export here and set plan.shards_dir (or set num_gpu)",
                None, config.source))
        plan = plan_for(config, facts.shape, memory)
        number, reason = plan.num_gpu, f"num_gpu: auto -> {plan.summary()}; memory from {source}"
    parameters["num_gpu"] = number
    model = dataclasses.replace(config.model, parameters=tuple(sorted(parameters.items())))
    return dataclasses.replace(config, model=model, num_gpu_planned=True), reason


@dataclass(frozen=True)
class RamNeed:
    """The RAM a load needs for the part of the model that stays off the GPUs,
    as llama.cpp allocates it with --no-mmap (with mmap the weights are page
    cache instead, which must fit just the same or every token reads the disk)."""

    num_gpu: int
    cpu_layers: int
    weights: int  # the CPU blocks, token_embd, the output head unless it is on a GPU
    kv_cache: int  # the CPU blocks' K and V at num_ctx x parallel
    compute: int  # the CPU's compute buffer: a block's attention and the logits
    allowance: int = PROCESS_ALLOWANCE

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.allowance

    def limit(self) -> int:
        """A container memory limit that holds it: the need plus LIMIT_MARGIN, in whole GiB."""
        return -(-(self.total + LIMIT_MARGIN) // GIB) * GIB

    def terms(self) -> str:
        return (f"{self.cpu_layers} CPU layer(s) and what stays with them: weights {self.weights / GIB:.1f} + KV {self.kv_cache / GIB:.1f} "
                f"+ compute {self.compute / GIB:.1f} + ollama's processes {self.allowance / GIB:.1f} GiB")


def ram_need(config: Config, shape: ModelShape, num_gpu: int, memory: list[int]) -> RamNeed:
    """What stays in RAM with `num_gpu` layers on the GPUs: llama.cpp offloads
    the last num_gpu blocks, the output head only above block_count; the
    token embeddings always stay on the CPU."""
    from builder.render.offload import N_UBATCH, Activations

    blocks = shape.block_count
    on_gpu = max(0, min(num_gpu, blocks + 1)) if config.gpus.kind != "none" else 0
    cpu_layers = blocks - min(on_gpu, blocks)
    context = default_num_ctx(config, memory) * effective_parallel(config, shape.total_bytes)[0]
    weights = sum(shape.block_bytes[:cpu_layers]) + shape.cpu_bytes + (shape.output_bytes if on_gpu <= blocks else 0)
    kv = cpu_layers * context * shape.kv_bytes_per_token_per_layer
    acts = Activations.of(shape, context, max(1, min(N_UBATCH, context)))
    compute = (acts.own_attention() if cpu_layers else 0) + acts.logits
    return RamNeed(on_gpu, cpu_layers, weights, kv, compute)
