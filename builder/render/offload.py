"""How many layers fit on the GPUs: `builder plan` and `num_gpu: auto`.

Pure arithmetic over the shards' GGUF headers (never their tensor data) and
the GPUs' memory. It mirrors how ollama 0.5.7's llama.cpp runner places a
model: the last `num_gpu` blocks go to the GPUs, each GPU holds its blocks'
weights and their KV cache (f16 K and V for every token of `num_ctx`), plus a
compute buffer and the CUDA context; token embeddings stay on the CPU, and the
output layer joins the GPUs only when every block fits. What is left of each
GPU is a safety margin, so the number errs low: ollama's own estimate errs
high on DeepSeek-R1 quants and runs out of memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from builder.supervisor.gguf import GGUFHeader

GIB = 1 << 30
MIB = 1 << 20
CUDA_OVERHEAD = 512 * MIB  # context, cuBLAS workspace: ollama reserves about this per GPU
DEFAULT_MARGIN = 1 * GIB
N_BATCH = 512  # llama.cpp's default ubatch

_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from the headers."""

    architecture: str
    block_count: int
    block_bytes: tuple[int, ...]
    output_bytes: int  # output.weight and output_norm: on the GPU only when all blocks are
    cpu_bytes: int  # token_embd and anything else that stays on the CPU
    n_embd: int
    n_head: int
    kv_bytes_per_token_per_layer: int

    @property
    def total_bytes(self) -> int:
        return sum(self.block_bytes) + self.output_bytes + self.cpu_bytes


def model_shape(headers: list[GGUFHeader]) -> ModelShape:
    """Combine the headers of every shard (metadata lives in shard 1)."""
    meta = headers[0].metadata
    arch = meta.get("general.architecture")
    if not arch:
        raise ValueError("the first shard has no general.architecture")

    def key(name: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"the first shard has no {arch}.{name}")
        return int(value)

    blocks = key("block_count")
    n_embd = key("embedding_length")
    n_head = key("attention.head_count")
    n_head_kv = key("attention.head_count_kv", n_head)
    key_length = key("attention.key_length", n_embd // n_head)
    value_length = key("attention.value_length", n_embd // n_head)
    block_bytes = [0] * blocks
    output = cpu = 0
    for header in headers:
        for tensor in header.tensors:
            match = _BLOCK.match(tensor.name)
            if match and int(match[1]) < blocks:
                block_bytes[int(match[1])] += tensor.nbytes
            elif tensor.name.startswith("output"):
                output += tensor.nbytes
            else:
                cpu += tensor.nbytes
    kv = n_head_kv * (key_length + value_length) * 2  # f16 K and V
    return ModelShape(arch, blocks, tuple(block_bytes), output, cpu, n_embd, n_head, kv)


@dataclass(frozen=True)
class GpuShare:
    index: int
    memory: int
    blocks: tuple[int, ...]
    weights: int
    kv_cache: int
    compute: int
    overhead: int

    @property
    def used(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead

    @property
    def spare(self) -> int:
        return self.memory - self.used


@dataclass(frozen=True)
class OffloadPlan:
    num_gpu: int
    block_count: int
    gpus: tuple[GpuShare, ...]
    num_ctx: int
    margin: int
    kv_per_layer: int
    compute_per_gpu: int
    rule_of_thumb: int
    parallel: int = 1

    def summary(self) -> str:
        memory = " + ".join(f"{g.memory / GIB:.0f}" for g in self.gpus)
        return (
            f"num_gpu {self.num_gpu} of {self.block_count} layers on {len(self.gpus)} GPU(s) ({memory} GiB): "
            f"each layer needs its weights plus {self.kv_per_layer / MIB:.0f} MiB of KV cache at num_ctx {self.num_ctx}"
            + (f" x {self.parallel} sequences" if self.parallel != 1 else "") + ", "
            f"each GPU {self.compute_per_gpu / MIB:.0f} MiB compute + {CUDA_OVERHEAD / MIB:.0f} MiB CUDA + "
            f"{self.margin / MIB:.0f} MiB margin (Unsloth's rule of thumb says {self.rule_of_thumb})"
        )

    def as_dict(self) -> dict:
        return {
            "num_gpu": self.num_gpu,
            "block_count": self.block_count,
            "num_ctx": self.num_ctx,
            "parallel": self.parallel,
            "kv_cache_per_layer_bytes": self.kv_per_layer,
            "compute_per_gpu_bytes": self.compute_per_gpu,
            "cuda_overhead_per_gpu_bytes": CUDA_OVERHEAD,
            "margin_per_gpu_bytes": self.margin,
            "unsloth_rule_of_thumb": self.rule_of_thumb,
            "gpus": [
                {
                    "index": g.index,
                    "memory_bytes": g.memory,
                    "layers": list(g.blocks),
                    "weights_bytes": g.weights,
                    "kv_cache_bytes": g.kv_cache,
                    "compute_bytes": g.compute,
                    "overhead_bytes": g.overhead,
                    "used_bytes": g.used,
                    "spare_bytes": g.spare,
                }
                for g in self.gpus
            ],
        }


def compute_buffer(shape: ModelShape, num_ctx: int) -> int:
    """The graph's scratch per GPU, in f32 for one batch of N_BATCH tokens: the
    attention scores and their softmax (num_ctx x n_head each), and room for
    sixteen activations of width n_embd (MoE routing, FFN intermediates)."""
    return 4 * N_BATCH * (2 * num_ctx * shape.n_head + 16 * shape.n_embd)


def unsloth_rule(total_vram: int, model_bytes: int, blocks: int) -> int:
    """floor(VRAM_GB / model_GB x blocks) - 4, within [0, blocks] (Unsloth's
    guide, which counts a card's memory as its nominal "24 GB", i.e. GiB,
    and the model's size in GB)."""
    return max(0, min(blocks, math.floor(total_vram / GIB / (model_bytes / 1e9) * blocks) - 4))


def plan_offload(shape: ModelShape, gpu_memory: list[int], num_ctx: int, margin: int = DEFAULT_MARGIN, parallel: int = 1) -> OffloadPlan:
    """Place the last blocks on the GPUs, in GPU order, while they fit. With
    `parallel` sequences ollama gives the runner num_ctx x parallel of context
    (server/sched.go): the KV cache and the attention scratch grow with it."""
    context = num_ctx * parallel
    kv_layer = context * shape.kv_bytes_per_token_per_layer
    compute = compute_buffer(shape, context)
    budgets = [memory - CUDA_OVERHEAD - compute - margin for memory in gpu_memory]
    placed: list[list[int]] = [[] for _ in gpu_memory]
    gpu = 0
    for block in range(shape.block_count - 1, -1, -1):
        need = shape.block_bytes[block] + kv_layer
        while gpu < len(budgets) and budgets[gpu] < need:
            gpu += 1
        if gpu == len(budgets):
            break
        budgets[gpu] -= need
        placed[gpu].append(block)
    num_gpu = sum(len(p) for p in placed)
    output_gpu = None
    if num_gpu == shape.block_count:
        output_gpu = next((i for i, budget in enumerate(budgets) if budget >= shape.output_bytes), None)
        if output_gpu is not None:
            num_gpu += 1  # llama.cpp counts the output layer as one more
    shares = []
    for index, (memory, blocks) in enumerate(zip(gpu_memory, placed)):
        weights = sum(shape.block_bytes[b] for b in blocks)
        if index == output_gpu:
            weights += shape.output_bytes
        shares.append(GpuShare(index, memory, tuple(sorted(blocks)), weights, kv_layer * len(blocks), compute, CUDA_OVERHEAD))
    rule = unsloth_rule(sum(gpu_memory), shape.total_bytes, shape.block_count)
    return OffloadPlan(num_gpu, shape.block_count, tuple(shares), num_ctx, margin, kv_layer, compute, rule, parallel)
