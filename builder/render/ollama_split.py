"""Where ollama 0.5.7 puts `num_gpu` layers: which GPUs, how many on each,
which blocks.

ollama chooses the GPUs and the split itself, from its own estimate, and
llama.cpp then places the blocks; builder only chooses num_gpu, so the plan
checks ollama's split against the memory model rather than choosing one:

1. The GPUs, sorted by free memory, largest first (server/sched.go,
   pickBestFullFitByLibrary). Unless OLLAMA_SCHED_SPREAD is set, the first
   GPU on which ollama's estimate fits num_gpu layers is used alone; else all
   of them, in that order, if the estimate fits num_gpu layers over all of
   them; else all of them in the order they were found
   (pickBestPartialFitByLibrary). That order is the runner's CUDA device
   order (CUDA_VISIBLE_DEVICES): the first one is llama.cpp's first GPU.
2. The estimate (llm/memory.go, EstimateGPULayers) walks the blocks from
   blk.0 up, charging blk.i's size plus its share of the KV cache, and deals
   them round-robin (block i to GPU i mod n) over the GPUs that still have
   room; a GPU leaves the round when the next block does not fit under its
   free memory less the graph estimate (llm/ggml.go, GraphSize) and 457 MiB
   (discover/gpu.go, cudaMinimumMemory). It stops at num_gpu; above the
   block count the output head is dealt the same way. Its per-GPU counts are
   the runner's --tensor-split.
3. llama.cpp (src/llama-model.cpp) offloads the last num_gpu blocks and hands
   them out in order, in proportion to --tensor-split: the first GPU gets the
   lowest of them. The output head goes to a GPU only with num_gpu above the
   block count.

So two equal GPUs get ceil(n/2) and floor(n/2) blocks, the first GPU the
larger half; 24 + 48 GiB gets the 48 first, round-robin until the 24 is full
by ollama's estimate, or the 48 alone while the estimate fits num_gpu layers
on it. ollama's estimate charges blk.0, blk.1, ... (three small dense blocks
for DeepSeek-R1) where llama.cpp offloads the last blocks (all
mixture-of-experts, larger): the reason ollama's own num_gpu runs out of
memory on R1, and why its split is checked here, not trusted.

Free memory is taken to be the GPU's whole memory (the card otherwise idle);
OLLAMA_GPU_OVERHEAD is taken to be unset (0). GraphSize's formula is
re-enacted for deepseek2; other architectures get ollama's own fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.render.offload import ModelShape

MIB = 1 << 20
MINIMUM_MEMORY = 457 * MIB  # discover/gpu.go cudaMinimumMemory
NUM_BATCH = 512  # api.DefaultOptions NumBatch


@dataclass(frozen=True)
class Layout:
    """The runner ollama starts: its GPUs in CUDA order (indices into the
    list given), ollama's --tensor-split, and llama.cpp's blocks per GPU."""

    gpus: tuple[int, ...]
    split: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]
    output: int | None  # CUDA position of the GPU holding the output head

    @property
    def placed(self) -> bool:
        """False when ollama's estimate fits no layer at all: it then runs on the CPU alone."""
        return bool(self.gpus)


def graph_estimate(shape: ModelShape, context: int, num_batch: int, gpus: int) -> int:
    """ollama's graph size per GPU (GraphSize: max of the partial- and
    full-offload figures; several GPUs use the partial one)."""
    batch = min(context, num_batch)
    embd, heads_kv, head_k, vocab = shape.n_embd, shape.n_head_kv, shape.key_length, shape.n_vocab
    if shape.architecture == "deepseek2":
        full = max(4 * batch * (3 * embd + vocab), 4 * batch * (3 * embd + 2 + context * (1 + heads_kv) + 2 * head_k * heads_kv))
        partial = max(
            4 * batch * (3 * embd + vocab) + embd * vocab * 105 // 128,
            4 * batch * (2 * embd + 1 + 2 * head_k * heads_kv + context + context * heads_kv)
            + 4 * head_k * context * heads_kv
            + embd * head_k * heads_kv * 9 // 16,
        )
        return partial if gpus > 1 else max(partial, full)
    kv = context * shape.block_count * shape.kv_bytes_per_token_per_layer
    return shape.n_head // max(shape.n_head_kv, 1) * kv // 6  # ollama's fallback for architectures it has no formula for


def estimate(shape: ModelShape, free: list[int], num_gpu: int, context: int, num_batch: int = NUM_BATCH) -> list[int]:
    """EstimateGPULayers' layer count per GPU, for GPUs with `free` bytes in this order."""
    blocks = shape.block_count
    kv_layer = context * shape.kv_bytes_per_token_per_layer  # ollama: kv / blockCount
    graph = graph_estimate(shape, context, num_batch, len(free))
    first = shape.block_bytes[0] + kv_layer if blocks else 0
    with_space = [i for i, f in enumerate(free) if f >= graph + MINIMUM_MEMORY + 2 * first]
    used = [MINIMUM_MEMORY + first for _ in free]
    counts = [0 for _ in free]
    placed = 0
    for i in range(blocks):
        if placed >= num_gpu:
            break
        size = shape.block_bytes[i] + kv_layer
        j = len(with_space)
        while j > 0:
            gpu = with_space[i % j]
            if free[gpu] > used[gpu] + graph + size:
                used[gpu] += size
                counts[gpu] += 1
                placed += 1
                break
            with_space.pop(i % j)
            j -= 1
    if shape.output_bytes and placed < num_gpu:
        for j in range(len(with_space), 0, -1):
            gpu = with_space[placed % j]
            if free[gpu] > used[gpu] + graph + shape.output_bytes:
                counts[gpu] += 1
                break
    return counts


def choose_gpus(shape: ModelShape, memory: list[int], num_gpu: int, context: int, num_batch: int = NUM_BATCH, spread: bool = False) -> list[int]:
    """The GPUs ollama's scheduler gives the runner, in CUDA order."""
    order = sorted(range(len(memory)), key=lambda i: -memory[i])

    def fits(gpus: list[int]) -> bool:
        return sum(estimate(shape, [memory[g] for g in gpus], num_gpu, context, num_batch)) >= num_gpu > 0

    if not spread:
        for gpu in order:
            if fits([gpu]):
                return [gpu]
    return order if fits(order) else list(range(len(memory)))


def llama_blocks(block_count: int, num_gpu: int, split: list[int]) -> tuple[tuple[tuple[int, ...], ...], int | None]:
    """llama.cpp's placement: the last num_gpu blocks, in order, in proportion
    to the split (upper_bound over its cumulative fractions); the output head
    only above block_count layers."""
    start = max(block_count - num_gpu, 0)
    active = min(num_gpu, block_count + 1)
    total = sum(split)
    cumulative = [sum(split[: i + 1]) for i in range(len(split))]

    def device(k: int) -> int:
        return next((i for i, c in enumerate(cumulative) if c * active > k * total), len(split) - 1)

    blocks: list[list[int]] = [[] for _ in split]
    for block in range(start, block_count):
        blocks[device(block - start)].append(block)
    output = device(active - 1) if num_gpu > block_count else None
    return tuple(tuple(b) for b in blocks), output


def layout(shape: ModelShape, memory: list[int], num_gpu: int, context: int, num_batch: int = NUM_BATCH, spread: bool = False) -> Layout:
    """Which GPUs ollama uses for num_gpu layers and which blocks each holds."""
    if num_gpu <= 0 or not memory:
        return Layout((), (), (), None)
    gpus = choose_gpus(shape, memory, num_gpu, context, num_batch, spread)
    counts = estimate(shape, [memory[g] for g in gpus], num_gpu, context, num_batch)
    if sum(counts) == 0:
        return Layout((), (), (), None)  # NewLlamaServer: no layer fits, the CPU runner
    split = counts if len(gpus) > 1 else [1]  # one GPU: no --tensor-split, it takes them all
    blocks, output = llama_blocks(shape.block_count, num_gpu, split)
    return Layout(tuple(gpus), tuple(counts), blocks, output)
