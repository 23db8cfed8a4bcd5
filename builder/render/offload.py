"""How many layers fit on the GPUs: `builder plan` and `num_gpu: auto`.

Pure arithmetic over the shards' GGUF headers (never their tensor data) and
the GPUs' memory. For each num_gpu, from the most layers down, it takes the
split ollama 0.5.7 will make (builder.render.ollama_split) and predicts each
GPU's peak in the terms llama.cpp logs and nvidia-smi shows:

    peak = model buffer + KV cache + compute buffer + CUDA context

and plans the largest num_gpu that leaves `margin` free on every GPU.

- model buffer: the weights of the blocks on that GPU (the output head too
  when all blocks are there), summed from the headers;
- KV cache: f16 K and V of every context token for each block there;
- CUDA context: not derived; measured on H200s (README, "num_gpu: auto and
  builder plan"): 528 MiB on a lone GPU, 602 on the first of several (it
  runs the host blocks' batched matmuls, whose cuBLAS and pool temporaries
  it keeps), 533 on each other one. IQ1_S's first GPU measured 532 and one
  second GPU 603: the spread is about 70 MiB, inside the margin;
- compute buffer: derived from llama.cpp's deepseek2 graph, below.

The compute buffer
------------------
llama.cpp sizes a GPU's compute buffer by allocating its worst-case graph,
one ubatch of n_ub = 512 tokens against the whole context, through
ggml-alloc: tensors are placed in graph order, best fit, and freed after
their last use; the buffer is the highest address reached. So it is the
tallest stack of tensors alive at once, the holes between them included.
(b4610 is the release closest to the llama.cpp ollama 0.5.7 vendors; the
graph, ggml-backend's scheduler and ggml-alloc are the same there.) In f32,
n_ub tokens:

    a     = n_embd x n_ub x 4           a hidden state: residual, norm output (14 MiB for R1)
    q     = n_head x d_k x n_ub x 4      Q, attn_q_b's output, and q_states, its RoPE'd concat (48 MiB)
    q_pe  = n_head x d_rope x n_ub x 4   Q's RoPE part made contiguous (16 MiB)
    kq    = n_ctx x n_ub x n_head x 4    the attention scores; softmax runs in place (256 KiB a token)
    mask  = n_ctx x pad32(n_ub) x 4      the KQ mask, copied once to each GPU (2 KiB a token)

Four points in the graph decide the buffer:

1. A block's attention, on the GPU holding the block (every GPU):

       mask + 3a + q_pe + 2q + kq

   kq fits in no hole, so it lands on q_states (its input, still alive),
   which landed on q and q_pe (its inputs), which sit on three a-sized
   slots: the residual stream, the normed input and the slot the previous
   block's ffn_inp left. At num_ctx 2048: 4 + 42 + 16 + 96 + 512 = 670 MiB,
   the second GPU's measured buffer; at 8192: 2218, also measured.

The first GPU does more, and that is where its extra comes from: ggml's
scheduler runs every op whose weight is in host memory on the first GPU when
the op has 32 rows or more (offload_op; n_ub = 512 has), copying the weight
in for that op alone (one split per weight, so each copy is freed before the
next), and the weightless ops between them (norms, KQ, softmax) follow. So
the first GPU computes all the blocks left on the CPU and the output head:

2. A CPU block's attention, its K and V caches (f16 views in host memory)
   copied whole, the attn_q_b copy in q_pe's slot:

       mask + 3a + W(attn_q_b) + 2q + K + V + kq
       K = n_ctx x n_head_kv x d_k x 2, V = n_ctx x n_head_kv x d_v x 2

   At 8192: 16 + 42 + 20 + 96 + 384 + 256 + 2048 = 2862 MiB, as measured.

3. A CPU block's feed-forward: each expert tensor is copied whole (700 MiB
   at IQ1_S, 784 at IQ1_M) above what the attention left, the mask, 3a, its
   output kqv = n_head x d_v x n_ub x 4 (32 MiB) and the attn_output copy:

       mask + 3a + kqv + W(attn_output) + W(up) + down_out       W(down) <= W(up)
       mask + 3a + kqv + W(attn_output) + W(up) + up_out + W(down)  otherwise

   down_out = n_embd x n_used x n_ub x 4 (112 MiB) lands on the down copy,
   which reuses up's slot; a larger down copy cannot, and lands on up's
   output, up_out = n_ff_exp x n_used x n_ub x 4 (32 MiB). This is where
   the type matters: IQ1_M gives 4 + 42 + 32 + 63 + 784 + 112 = 1037 MiB
   (measured 1033), IQ1_S only 953.

4. The output head, in host memory unless every block is on the GPUs:

       W(output) + logits + a    (logits = n_vocab x n_ub x 4, 252.5 MiB)

   plus mask + 2a when the last block ran on this GPU: 725 + 252.5 + 14 =
   991 MiB, IQ1_S's measured first GPU (its experts' 953 is less).

With every block and the head on the GPUs and more than one GPU, llama.cpp
pipelines ubatches and keeps 4 copies of each GPU's inputs: 4a + 3 mask more
on every GPU, and the GPU holding the head computes it there (mask + 3a +
logits over those copies). Below 32 rows in a ubatch nothing is offloaded
and only point 1 remains.

The terms are the graph's tensors; the only numbers besides the model's are
the 3 slots, pad32 (GGML_KQ_MASK_PAD) and the 4 pipeline copies. Where the
allocator's holes vary from block to block the formula is not exact: a step
by step re-enactment of ggml-backend's scheduler and ggml-alloc over this
graph (not shipped) gives the H200 table's buffers to the MiB, and this
formula within -8 and +37 MiB of it (under 1 % of the buffer) for the four
quants, 1 or 2 GPUs, 512 to 16384 tokens and 0 to 62 layers; within -6 and
+103 MiB when the first blocks' down_proj is larger than their up_proj.
Other architectures reuse these points unchecked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from builder.render import ollama_split
from builder.supervisor.gguf import GGUFHeader, TensorInfo

GIB = 1 << 30
MIB = 1 << 20
DEFAULT_MARGIN = 1 * GIB
N_UBATCH = 512  # llama.cpp's default n_ubatch, which ollama keeps
KQ_MASK_PAD = 32  # GGML_KQ_MASK_PAD
OFFLOAD_MIN_BATCH = 32  # ggml-cuda offload_op: ops of fewer rows stay on the CPU
PIPELINE_COPIES = 4  # GGML_SCHED_MAX_COPIES, used when every layer is on several GPUs
CUDA_CONTEXT_ALONE = 528 * MIB  # measured, see above
CUDA_CONTEXT_FIRST = 602 * MIB
CUDA_CONTEXT_OTHER = 533 * MIB

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight|\.bias)?$")
_ATTENTION_IN = ("attn_q_b", "attn_q", "attn_qkv", "attn_kv_b", "attn_k", "attn_v")


@dataclass(frozen=True)
class BlockWeights:
    """What the first GPU copies in when the block stays on the CPU."""

    attention_in: int  # attn_q_b (the largest projection before KQ)
    attention_out: int  # attn_output
    up: int  # ffn_up_exps, else ffn_up
    gate: int
    down: int
    up_rows: int  # rows of up's output per token: n_ff_exp x n_used, or n_ff
    down_rows: int  # rows of down's output per token: n_embd x n_used, or n_embd


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
    n_head_kv: int = 0
    key_length: int = 0
    value_length: int = 0
    rope_dims: int = 0
    n_vocab: int = 0
    output_weight: int = 0  # output.weight alone (token_embd.weight when tied)
    blocks: tuple[BlockWeights, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(self.block_bytes) + self.output_bytes + self.cpu_bytes


def _block_weights(tensors: dict[str, TensorInfo], n_embd: int, n_used: int) -> BlockWeights:
    def size(name: str) -> int:
        return tensors[name].nbytes if name in tensors else 0

    def rows(name: str) -> int:
        shape = tensors[name].shape if name in tensors else ()
        return shape[1] if len(shape) > 1 else 0

    experts = "ffn_up_exps" in tensors
    up, gate, down = (f"ffn_{part}_exps" if experts else f"ffn_{part}" for part in ("up", "gate", "down"))
    per_token = n_used if experts else 1
    return BlockWeights(
        max((size(name) for name in _ATTENTION_IN), default=0),
        size("attn_output"),
        size(up),
        size(gate),
        size(down),
        rows(up) * per_token,
        (rows(down) or n_embd) * per_token if down in tensors else 0,
    )


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
    rope_dims = key("rope.dimension_count", key_length - value_length if key_length > value_length else key_length)
    n_used = key("expert_used_count", 0)
    block_bytes = [0] * blocks
    per_block: list[dict[str, TensorInfo]] = [{} for _ in range(blocks)]
    output = cpu = output_weight = vocab_rows = 0
    for header in headers:
        for tensor in header.tensors:
            match = _BLOCK.match(tensor.name)
            if match and int(match[1]) < blocks:
                block_bytes[int(match[1])] += tensor.nbytes
                per_block[int(match[1])][match[2]] = tensor
            elif tensor.name.startswith("output"):
                output += tensor.nbytes
                if tensor.name == "output.weight":
                    output_weight = tensor.nbytes  # wins over token_embd.weight, in any shard order
                    vocab_rows = tensor.shape[1] if len(tensor.shape) > 1 else 0
            else:
                cpu += tensor.nbytes
                if tensor.name == "token_embd.weight" and not output_weight:
                    output_weight = tensor.nbytes  # tied embeddings: the head multiplies by token_embd
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if isinstance(tokens, list) else int(tokens or vocab_rows)
    kv = n_head_kv * (key_length + value_length) * 2  # f16 K and V
    return ModelShape(
        arch, blocks, tuple(block_bytes), output, cpu, n_embd, n_head, kv, n_head_kv, key_length, value_length,
        rope_dims, n_vocab, output_weight, tuple(_block_weights(t, n_embd, n_used) for t in per_block),
    )


@dataclass(frozen=True)
class Activations:
    """The graph's tensors at one ubatch, in bytes (see the module docstring)."""

    a: int
    q: int
    q_pe: int
    kq: int
    mask: int
    kqv: int
    k_copy: int
    v_copy: int
    logits: int
    n_ub: int

    @classmethod
    def of(cls, shape: ModelShape, n_ctx: int, n_ub: int) -> Activations:
        f32 = 4
        return cls(
            a=shape.n_embd * n_ub * f32,
            q=shape.n_head * shape.key_length * n_ub * f32,
            q_pe=shape.n_head * shape.rope_dims * n_ub * f32,
            kq=n_ctx * n_ub * shape.n_head * f32,
            mask=n_ctx * -(-n_ub // KQ_MASK_PAD) * KQ_MASK_PAD * f32,
            kqv=shape.n_head * shape.value_length * n_ub * f32,
            k_copy=n_ctx * shape.n_head_kv * shape.key_length * 2,
            v_copy=n_ctx * shape.n_head_kv * shape.value_length * 2,
            logits=shape.n_vocab * n_ub * f32,
            n_ub=n_ub,
        )

    def own_attention(self) -> int:
        """Point 1: a block's attention on the GPU that holds it."""
        return self.mask + 3 * self.a + self.q_pe + 2 * self.q + self.kq

    def host_attention(self, block: BlockWeights) -> int:
        """Point 2: a CPU block's attention, on the first GPU."""
        return self.mask + 3 * self.a + block.attention_in + 2 * self.q + self.k_copy + self.v_copy + self.kq

    def host_ffn(self, block: BlockWeights) -> int:
        """Point 3: a CPU block's feed-forward, on the first GPU."""
        first = max(block.up, block.gate)
        up_out, down_out = block.up_rows * self.n_ub * 4, block.down_rows * self.n_ub * 4
        stacked = first + down_out if block.down <= first else first + up_out + block.down
        return self.mask + 3 * self.a + self.kqv + block.attention_out + stacked

    def host_output(self, shape: ModelShape, last_block_here: bool) -> int:
        """Point 4: the output head from host memory, on the first GPU."""
        return (self.mask + 2 * self.a if last_block_here else 0) + self.a + shape.output_weight + self.logits


def compute_buffers(shape: ModelShape, blocks: tuple[tuple[int, ...], ...], output: int | None, n_ctx: int, n_ub: int) -> list[tuple[int, str]]:
    """Each GPU's compute buffer (in CUDA order, holding `blocks`, the output
    head on GPU `output` or in host memory) and the point that sizes it."""
    acts = Activations.of(shape, n_ctx, n_ub)
    on_gpu = {block for held in blocks for block in held}
    host = [shape.blocks[b] for b in range(shape.block_count) if b not in on_gpu and b < len(shape.blocks)]
    last = next((p for p, held in enumerate(blocks) if shape.block_count - 1 in held), None)
    pipelined = output is not None and len(blocks) > 1
    copies = PIPELINE_COPIES * acts.a + (PIPELINE_COPIES - 1) * acts.mask if pipelined else 0
    result = []
    for position, held in enumerate(blocks):
        points: list[tuple[int, str]] = []
        if held:
            points.append((copies + acts.own_attention(), "attention"))
        if output == position:
            points.append((copies + acts.mask + 3 * acts.a + acts.logits, "output head"))
        if position == 0 and n_ub >= OFFLOAD_MIN_BATCH:
            if host:
                points.append((max(acts.host_attention(b) for b in host), "attention of CPU layers"))
                points.append((max(acts.host_ffn(b) for b in host), "feed-forward of CPU layers"))
            if output is None:
                points.append((acts.host_output(shape, last in (0, None)), "output head from the CPU"))
        result.append(max(points, default=(0, "nothing")))
    return result


def cuda_context(position: int, gpus: int) -> int:
    """The measured CUDA context and allocator slack of the GPU at `position` of `gpus`."""
    if gpus == 1:
        return CUDA_CONTEXT_ALONE
    return CUDA_CONTEXT_FIRST if position == 0 else CUDA_CONTEXT_OTHER


@dataclass(frozen=True)
class GpuShare:
    index: int  # in the list of GPUs given (plan.gpu_memory_gib, nvidia-smi)
    memory: int
    position: int | None  # CUDA device in ollama's runner; None: ollama leaves this GPU out
    blocks: tuple[int, ...]
    weights: int  # llama.cpp's "model buffer"
    kv_cache: int
    compute: int
    overhead: int  # CUDA context
    compute_point: str = ""

    @property
    def used(self) -> int:
        """The predicted peak, as nvidia-smi shows it."""
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
    rule_of_thumb: int
    parallel: int = 1
    ubatch: int = N_UBATCH
    split: tuple[int, ...] = ()  # ollama's --tensor-split, in CUDA order

    def summary(self) -> str:
        if not self.gpus:
            return (f"num_gpu 0 of {self.block_count} layers: no GPU, the model runs on the CPU; each layer's KV cache "
                    f"is {self.kv_per_layer / MIB:.0f} MiB at num_ctx {self.num_ctx}" + (f" x {self.parallel} sequences" if self.parallel != 1 else ""))
        memory = " + ".join(f"{g.memory / GIB:.0f}" for g in self.gpus)
        used = [g for g in sorted(self.gpus, key=lambda g: g.position if g.position is not None else len(self.gpus)) if g.position is not None]
        where = ", ".join(f"{len(g.blocks)} on GPU {g.index}" for g in used) or "none on the GPUs"
        return (
            f"num_gpu {self.num_gpu} of {self.block_count} layers on {len(self.gpus)} GPU(s) ({memory} GiB): "
            f"ollama 0.5.7 puts {where}; each layer needs its weights plus {self.kv_per_layer / MIB:.0f} MiB of KV cache "
            f"at num_ctx {self.num_ctx}" + (f" x {self.parallel} sequences" if self.parallel != 1 else "") + ", "
            f"each GPU a compute buffer, its CUDA context and {self.margin / MIB:.0f} MiB margin "
            f"(Unsloth's rule of thumb says {self.rule_of_thumb})"
        )

    def as_dict(self) -> dict:
        return {
            "num_gpu": self.num_gpu,
            "block_count": self.block_count,
            "num_ctx": self.num_ctx,
            "parallel": self.parallel,
            "ubatch": self.ubatch,
            "tensor_split": list(self.split),
            "kv_cache_per_layer_bytes": self.kv_per_layer,
            "margin_per_gpu_bytes": self.margin,
            "unsloth_rule_of_thumb": self.rule_of_thumb,
            "gpus": [
                {
                    "index": g.index,
                    "cuda_position": g.position,
                    "memory_bytes": g.memory,
                    "layers": list(g.blocks),
                    "weights_bytes": g.weights,
                    "kv_cache_bytes": g.kv_cache,
                    "compute_bytes": g.compute,
                    "compute_point": g.compute_point,
                    "overhead_bytes": g.overhead,
                    "used_bytes": g.used,
                    "spare_bytes": g.spare,
                }
                for g in self.gpus
            ],
        }


def unsloth_rule(total_vram: int, model_bytes: int, blocks: int) -> int:
    """floor(VRAM_GB / model_GB x blocks) - 4, within [0, blocks] (Unsloth's
    guide, which counts a card's memory as its nominal "24 GB", i.e. GiB,
    and the model's size in GB)."""
    return max(0, min(blocks, math.floor(total_vram / GIB / (model_bytes / 1e9) * blocks) - 4))


def shares_for(shape: ModelShape, gpu_memory: list[int], layout: ollama_split.Layout, context: int, n_ub: int) -> tuple[GpuShare, ...]:
    """Each GPU's predicted peak under ollama's layout (GPUs it leaves out: nothing)."""
    kv_layer = context * shape.kv_bytes_per_token_per_layer
    computes = compute_buffers(shape, layout.blocks, layout.output, context, n_ub)
    shares = []
    for index, memory in enumerate(gpu_memory):
        if index not in layout.gpus:
            shares.append(GpuShare(index, memory, None, (), 0, 0, 0, 0))
            continue
        position = layout.gpus.index(index)
        held = layout.blocks[position]
        weights = sum(shape.block_bytes[b] for b in held) + (shape.output_bytes if layout.output == position else 0)
        compute, point = computes[position]
        shares.append(GpuShare(index, memory, position, held, weights, kv_layer * len(held), compute,
                               cuda_context(position, len(layout.gpus)), point))
    return tuple(shares)


def plan_offload(shape: ModelShape, gpu_memory: list[int], num_ctx: int, margin: int = DEFAULT_MARGIN, parallel: int = 1,
                 batch: int = N_UBATCH, spread: bool = False) -> OffloadPlan:
    """The largest num_gpu whose predicted peak leaves `margin` free on every
    GPU, under the split ollama makes for it. With `parallel` sequences
    ollama gives the runner num_ctx x parallel of context (server/sched.go):
    the KV cache and the attention grow with it. `batch` is llama.cpp's
    ubatch (512 unless num_batch x parallel is smaller); `spread` is
    OLLAMA_SCHED_SPREAD."""
    context = num_ctx * parallel
    n_ub = max(1, min(batch, context))
    rule = unsloth_rule(sum(gpu_memory), shape.total_bytes, shape.block_count)
    kv_layer = context * shape.kv_bytes_per_token_per_layer
    for num_gpu in range(shape.block_count + 1 if shape.output_bytes else shape.block_count, 0, -1):
        layout = ollama_split.layout(shape, gpu_memory, num_gpu, context, spread=spread)
        if not layout.placed:
            continue
        shares = shares_for(shape, gpu_memory, layout, context, n_ub)
        if all(share.spare >= margin for share in shares if share.position is not None):
            return OffloadPlan(num_gpu, shape.block_count, shares, num_ctx, margin, kv_layer, rule, parallel, n_ub, layout.split)
    idle = tuple(GpuShare(index, memory, None, (), 0, 0, 0, 0) for index, memory in enumerate(gpu_memory))
    return OffloadPlan(0, shape.block_count, idle, num_ctx, margin, kv_layer, rule, parallel, n_ub)
