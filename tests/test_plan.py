"""`builder plan` and `num_gpu: auto` on header-only shards laid out like the
four DeepSeek-R1 quants (tests/fixtures/deepseek_headers.py), held to real
GPU measurements and compared with Unsloth's rule of thumb.

The measurements (README, "num_gpu: auto and builder plan", "The evidence";
the compute buffers and CUDA contexts are also quoted in
builder/render/offload.py's docstring): llama.cpp b4610 with CUDA on two
141 GB H200s, `-sm layer -b 512 -ub 512`, shards of this layout, buffers as
llama.cpp logged them, peak per GPU from nvidia-smi. README promises that the
planned peaks are within 0.35 % of the measured ones: every row is held to
that (model and KV buffers to the MiB, the compute buffer to 1 %), and the
layer counts the measurements imply for 24 GiB cards (an RTX 4090 reports
24564 MiB) are the ones planned.

Nothing here compares the planner with itself. The expected values are
either the measured numbers, written out below, or recomputed here from
first principles, without the code under test: tensor bytes from the
fixture's shapes and types with gguf's GGML_QUANT_SIZES, the KV cache from
the head sizes, the compute buffer from the graph's tensors as
offload.py's docstring derives them (checked against the measured buffers
by test_the_independent_model_reproduces_the_measurements), the CUDA
context as measured.

Where we differ from floor(VRAM_GB / model_GB x 61) - 4: the rule spreads the
model evenly over 61 layers and subtracts 4 layers as a blanket margin. We
take the split ollama 0.5.7 makes (the last blocks, all mixture-of-experts,
bigger than the average because the first 3 are dense; ceil(n/2) of them on
the first of two GPUs) and charge each GPU its blocks' weights, their KV
cache at num_ctx (160 MiB a block at 2048), the compute buffer llama.cpp's
graph needs at its place (670 MiB on a second GPU at 2048; 1037 on the
first, which also runs the blocks left on the CPU), its CUDA context and a
1 GiB margin. On one 24 GB card that leaves room for 3 layers more than the
rule; on 2 x 80 GB, as many or one more. Every plan is checked to leave the
margin free on every GPU, by the independent arithmetic.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import pytest
import yaml

from builder.render import ollama_split
from builder.render.offload import MIB, ModelShape, model_shape, plan_offload, shares_for
from builder.supervisor.gguf import read_header_file
from tests.fixtures.deepseek_headers import (
    BLOCKS, DENSE, EMBD, FF, FF_EXPERT, HEADS, KEY, ROPE, USED, VALUE, VARIANTS, VOCAB, tensors_for, total_bytes, write_variant,
)
from tests.helpers import run_builder

# (variant, GPUs in GiB) -> (our num_gpu, Unsloth's rule of thumb)
EXPECTED = {
    ("DeepSeek-R1-UD-IQ1_S", (24,)): (9, 6),
    ("DeepSeek-R1-UD-IQ1_S", (80,)): (33, 31),
    ("DeepSeek-R1-UD-IQ1_S", (80, 80)): (62, 61),  # every block and the output layer
    ("DeepSeek-R1-UD-IQ1_M", (24,)): (8, 5),
    ("DeepSeek-R1-UD-IQ1_M", (24, 24)): (16, 15),  # the reference deployment ran 14 on 2 x 24 GB
    ("DeepSeek-R1-UD-IQ1_M", (80,)): (29, 27),
    ("DeepSeek-R1-UD-IQ2_XXS", (24,)): (7, 4),
    ("DeepSeek-R1-UD-IQ2_XXS", (80, 80)): (50, 50),
    ("DeepSeek-R1-UD-Q2_K_XL", (24,)): (5, 2),
    ("DeepSeek-R1-UD-Q2_K_XL", (80,)): (20, 17),
    ("DeepSeek-R1-UD-Q2_K_XL", (80, 80)): (40, 39),
}
GIB = 1 << 30
RTX_4090 = 24564 / 1024  # GiB: what nvidia-smi reports for a "24 GB" card
H200 = 141 * 10**9
MARGIN_MIB = 1024  # plan.margin_gib's default
PEAK_TOLERANCE = 0.0035  # README: "the planned peaks are within 0.35 %" (plan.margin_gib; "The evidence")
COMPUTE_TOLERANCE = 0.01  # offload.py: the compute formula is within 1 % of the buffer llama.cpp allocates

# The H200 measurements (MiB), per GPU in device order, as recorded in README's
# "The evidence" table (llama.cpp b4610's buffer lines, nvidia-smi's peak):
# (variant, num_gpu, num_ctx, GPUs) -> (model buffer, KV, compute, peak) per GPU
MEASURED = {
    ("IQ1_M", 0, 2048, 1): [(0, 0, 1033, 1561)],
    ("IQ1_M", 8, 2048, 1): [(19934, 1280, 1033, 22779)],
    ("IQ1_M", 16, 2048, 1): [(39869, 2560, 1033, 43997)],
    ("IQ1_M", 16, 4096, 1): [(39869, 5120, 1516, 47037)],
    ("IQ1_M", 16, 2048, 2): [(19934, 1280, 1033, 22849), (19934, 1280, 670, 22417)],
    ("IQ1_M", 18, 2048, 2): [(22426, 1440, 1033, 25501), (22426, 1440, 670, 25139)],
    ("IQ1_M", 16, 8192, 2): [(19934, 5120, 2862, 28519), (19934, 5120, 2218, 27805)],
    ("IQ1_S", 16, 2048, 2): [(17918, 1280, 991, 20721), (17918, 1280, 670, 20401)],
}
# The blocks each GPU held in those runs: llama.cpp (src/llama-model.cpp) offloads
# the last num_gpu blocks, split evenly between equal GPUs with -sm layer, the
# first GPU taking the lower ones (upper_bound over the split's cumulative
# fractions: 18 layers go 9 + 9, blocks 43-51 and 52-60).
RUN_BLOCKS = {
    (0, 1): [()],
    (8, 1): [tuple(range(53, 61))],
    (16, 1): [tuple(range(45, 61))],
    (16, 2): [tuple(range(45, 53)), tuple(range(53, 61))],
    (18, 2): [tuple(range(43, 52)), tuple(range(52, 61))],
}
# What the first GPU's compute buffer is made of in each run (builder/render/offload.py)
FIRST_GPU_POINT = {2048: {"IQ1_M": "feed-forward of CPU layers", "IQ1_S": "output head from the CPU"},
                   4096: {"IQ1_M": "attention of CPU layers"}, 8192: {"IQ1_M": "attention of CPU layers"}}
# The CUDA context and allocator slack, measured (README: the peak minus the
# buffers): 528 MiB on a lone GPU, 602 on the first of several, 533 on each other one.
CUDA_CONTEXT_MIB = {"alone": 528, "first": 602, "other": 533}


# --- First principles, without the code under test ---------------------------

def _tensor_bytes(shape: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> int:
    """ggml's size of a tensor: rows of shape[0] elements in blocks of the type."""
    block, size = gguf.constants.GGML_QUANT_SIZES[kind]
    assert shape[0] % block == 0, (shape, kind)
    return math.prod(shape) // block * size


def _variant_tensors(variant: str) -> dict[str, int]:
    return {name: _tensor_bytes(shape, kind) for name, shape, kind in tensors_for(VARIANTS[f"DeepSeek-R1-UD-{variant}"][0])}


TENSOR_BYTES = {variant: _variant_tensors(variant) for variant in ("IQ1_S", "IQ1_M", "IQ2_XXS", "Q2_K_XL")}
BLOCK_BYTES = {
    variant: tuple(sum(size for name, size in tensors.items() if name.startswith(f"blk.{b}.")) for b in range(BLOCKS))
    for variant, tensors in TENSOR_BYTES.items()
}
HEAD_BYTES = {variant: tensors["output.weight"] + tensors["output_norm.weight"] for variant, tensors in TENSOR_BYTES.items()}
KV_BYTES_PER_TOKEN = HEADS * (KEY + VALUE) * 2  # f16 K (128 heads x 192) and V (128 heads x 128), per block


def moe_block_mib(variant: str) -> float:
    sizes = set(BLOCK_BYTES[variant][DENSE:])
    assert len(sizes) == 1, sizes  # every mixture-of-experts block is the same size
    return sizes.pop() / MIB


def kv_mib(context: int) -> float:
    return context * KV_BYTES_PER_TOKEN / MIB


def compute_bytes(variant: str, held: list[tuple[int, ...]], head_at: int | None, context: int) -> list[int]:
    """Each GPU's compute buffer, from the graph's tensors (offload.py's
    docstring, points 1-4), with the sizes taken from the fixture's shapes."""
    n_ub = min(512, context)
    a = EMBD * n_ub * 4
    q = HEADS * KEY * n_ub * 4
    q_pe = HEADS * ROPE * n_ub * 4
    kq = context * n_ub * HEADS * 4
    mask = context * -(-n_ub // 32) * 32 * 4
    kqv = HEADS * VALUE * n_ub * 4
    k_copy, v_copy = context * HEADS * KEY * 2, context * HEADS * VALUE * 2
    logits = VOCAB * n_ub * 4
    sizes = TENSOR_BYTES[variant]

    def weight(block: int, name: str) -> int:
        return sizes.get(f"blk.{block}.{name}.weight", 0)

    def feed_forward(block: int) -> int:
        moe = block >= DENSE
        up, gate, down = (weight(block, f"ffn_{part}_exps" if moe else f"ffn_{part}") for part in ("up", "gate", "down"))
        used = USED if moe else 1
        up_out, down_out = (FF_EXPERT if moe else FF) * used * n_ub * 4, EMBD * used * n_ub * 4
        first = max(up, gate)
        stacked = first + down_out if down <= first else first + up_out + down
        return mask + 3 * a + kqv + weight(block, "attn_output") + stacked

    on_gpu = {b for blocks in held for b in blocks}
    host = [b for b in range(BLOCKS) if b not in on_gpu]
    last = next((p for p, blocks in enumerate(held) if BLOCKS - 1 in blocks), None)
    copies = 4 * a + 3 * mask if head_at is not None and len(held) > 1 else 0  # pipelined ubatches
    result = []
    for position, blocks in enumerate(held):
        points = [0]
        if blocks:
            points.append(copies + mask + 3 * a + q_pe + 2 * q + kq)
        if head_at == position:
            points.append(copies + mask + 3 * a + logits)
        if position == 0:
            points += [mask + 3 * a + weight(b, "attn_q_b") + 2 * q + k_copy + v_copy + kq for b in host]
            points += [feed_forward(b) for b in host]
            if head_at is None:
                points.append((mask + 2 * a if last in (0, None) else 0) + a + sizes["output.weight"] + logits)
        result.append(max(points))
    return result


def cuda_context_bytes(position: int, gpus: int) -> int:
    return CUDA_CONTEXT_MIB["alone" if gpus == 1 else "first" if position == 0 else "other"] * MIB


def expected_gpus(variant: str, held: list[tuple[int, ...]], head_at: int | None, context: int) -> list[dict[str, int]]:
    """Each GPU's buffers and peak in bytes, in CUDA order, from first principles."""
    computes = compute_bytes(variant, held, head_at, context)
    out = []
    for position, blocks in enumerate(held):
        weights = sum(BLOCK_BYTES[variant][b] for b in blocks) + (HEAD_BYTES[variant] if head_at == position else 0)
        kv = len(blocks) * context * KV_BYTES_PER_TOKEN
        context_bytes = cuda_context_bytes(position, len(held))
        out.append({"weights": weights, "kv": kv, "compute": computes[position], "overhead": context_bytes,
                    "peak": weights + kv + computes[position] + context_bytes})
    return out


def head_position(num_gpu: int, split: list[int] | tuple[int, ...]) -> int | None:
    """llama.cpp puts the output head on a GPU only above the block count, on
    the last GPU of the split that has a share (the last layer's device)."""
    return max(i for i, count in enumerate(split) if count) if num_gpu > BLOCKS else None


def within(predicted_mib: float, truth_mib: float, tolerance: float) -> bool:
    return abs(predicted_mib - truth_mib) <= tolerance * truth_mib


def rule_of_thumb(gib: tuple[float, ...], model_bytes: int) -> int:
    """Unsloth's guide: floor(VRAM_GB / model_GB x 61) - 4, the cards' "24 GB" as GiB."""
    return max(0, min(BLOCKS, math.floor(sum(gib) / (model_bytes / 1e9) * BLOCKS) - 4))


def grow(peak: float, blocks: int, variant: str, context: int) -> float:
    """A measured peak with `blocks` mixture-of-experts blocks more (or fewer):
    their weights and KV cache; the compute buffer and CUDA context stay."""
    return peak + blocks * (moe_block_mib(variant) + kv_mib(context))


# The most layers one or two 24 GiB cards hold with 1 GiB to spare, from the
# measurements: (variant, num_ctx, GPUs) -> (that count, each GPU's peak there,
# each GPU's peak with one layer more), MiB. Two equal GPUs take ceil(n/2)
# and floor(n/2) blocks; only whole MoE blocks are added to or taken from a
# measured GPU, which leaves its compute buffer and CUDA context as measured.
SECOND_GPU_ATTENTION_4096 = 670 + (2218 - 670) * (4096 - 2048) / (8192 - 2048)  # KQ and mask grow linearly with n_ctx
FIRST_OF_TWO_OVER_ALONE = 22849 - 22779  # the same 8 blocks and compute at 2048: first of two GPUs vs alone


def _second_4096(blocks: int) -> float:
    """The ngl 16 2048 run's second GPU, its 8 blocks at 2048 swapped for `blocks` at 4096."""
    return 22417 - 8 * (moe_block_mib("IQ1_M") + kv_mib(2048)) + blocks * (moe_block_mib("IQ1_M") + kv_mib(4096)) + SECOND_GPU_ATTENTION_4096 - 670


TRUTH = {
    # 16 is the ngl 16 run; 17 puts 9 blocks on the first GPU, as the ngl 18 run did (25501)
    ("IQ1_M", 2048, 2): (16, [22849, 22417], [25501, 22417]),
    # 8 is the ngl 8 run; 9 is one block more
    ("IQ1_M", 2048, 1): (8, [22779], [grow(22779, 1, "IQ1_M", 2048)]),
    # the ngl 16 run at 4096 on one GPU, less blocks, as the first of two; the second from the 2048 run
    ("IQ1_M", 4096, 2): (14, [grow(47037, -9, "IQ1_M", 4096) + FIRST_OF_TWO_OVER_ALONE, _second_4096(7)],
                         [grow(47037, -8, "IQ1_M", 4096) + FIRST_OF_TWO_OVER_ALONE, _second_4096(7)]),
    # the ngl 16 run at 8192, 2 blocks fewer on each GPU; 13 puts 7 on the first
    ("IQ1_M", 8192, 2): (12, [grow(28519, -2, "IQ1_M", 8192), grow(27805, -2, "IQ1_M", 8192)],
                         [grow(28519, -1, "IQ1_M", 8192), grow(27805, -2, "IQ1_M", 8192)]),
    # the IQ1_S ngl 16 run, one block more on each GPU; 19 puts 10 on the first
    ("IQ1_S", 2048, 2): (18, [grow(20721, 1, "IQ1_S", 2048), grow(20401, 1, "IQ1_S", 2048)],
                         [grow(20721, 2, "IQ1_S", 2048), grow(20401, 1, "IQ1_S", 2048)]),
}


def test_the_truth_table_follows_from_the_measurements() -> None:
    """The counts in TRUTH fit 24564 MiB (an RTX 4090) with the margin and one
    layer more does not fit even 24576 MiB (24 GiB), by the measured peaks."""
    for (variant, num_ctx, gpus), (count, peaks, one_more) in TRUTH.items():
        assert len(peaks) == len(one_more) == gpus
        assert all(peak + MARGIN_MIB <= 24564 for peak in peaks), (variant, num_ctx, gpus, peaks)
        assert any(peak + MARGIN_MIB > 24576 for peak in one_more), (variant, num_ctx, gpus, one_more)


@pytest.mark.parametrize("row", sorted(MEASURED), ids=lambda row: "-".join(map(str, row)))
def test_the_independent_model_reproduces_the_measurements(row: tuple[str, int, int, int]) -> None:
    """The first-principles arithmetic this file checks the planner with,
    held to the measured table: model buffers to the MiB, KV exactly, compute
    within 1 %, peak within 0.35 %."""
    variant, ngl, num_ctx, gpus = row
    for expected, (model, kv, compute, peak) in zip(expected_gpus(variant, RUN_BLOCKS[(ngl, gpus)], None, num_ctx), MEASURED[row], strict=True):
        assert round(expected["weights"] / MIB) == model
        assert expected["kv"] / MIB == kv
        assert within(expected["compute"] / MIB, compute, COMPUTE_TOLERANCE), (expected["compute"] / MIB, compute)
        assert within(expected["peak"] / MIB, peak, PEAK_TOLERANCE), (expected["peak"] / MIB, peak)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("r1")
    for folder in VARIANTS:
        write_variant(root / "models", folder)
    return root


def shape_of(models: Path, variant: str) -> ModelShape:
    folder = models / "models" / f"DeepSeek-R1-UD-{variant}"
    return model_shape([read_header_file(str(path)) for path in sorted(folder.glob("*.gguf"))])


def config_for(root: Path, folder: str, gpus: tuple[float, ...] | None, num_gpu: str = "auto", extra: str = "") -> Path:
    _experts, shards = VARIANTS[folder]
    memory = f"plan:\n  gpu_memory_gib: {list(gpus)}\n" if gpus else ""
    text = (
        f"version: 1\nmodel:\n  name: r1\n  shards: {folder}/{folder}-00001-of-{shards:05d}.gguf\n"
        f"  parameters:\n    num_gpu: {num_gpu}\n    num_ctx: 2048\n"
        f"storage:\n  local: models\n{memory}{extra}"
    )
    path = root / f"{folder}-{'-'.join(map(str, gpus or ()))}-{abs(hash(extra)) % 10**6}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("row", sorted(MEASURED), ids=lambda row: "-".join(map(str, row)))
def test_every_measured_row_within_0_35_percent(models: Path, row: tuple[str, int, int, int]) -> None:
    variant, ngl, num_ctx, gpus = row
    shape = shape_of(models, variant)
    # the runs split the layers evenly (llama.cpp's default between equal GPUs): the blocks they held
    blocks = RUN_BLOCKS[(ngl, gpus)]
    assert ollama_split.llama_blocks(shape.block_count, ngl, [1] * gpus) == (tuple(blocks), None)
    layout = ollama_split.Layout(tuple(range(gpus)), (1,) * gpus, tuple(blocks), None)
    shares = shares_for(shape, [H200] * gpus, layout, num_ctx, 512)
    for share, held, (model, kv, compute, peak) in zip(shares, blocks, MEASURED[row], strict=True):
        assert share.blocks == held
        assert round(share.weights / MIB) == model
        assert share.kv_cache / MIB == kv
        assert within(share.compute / MIB, compute, COMPUTE_TOLERANCE), f"compute {share.compute / MIB:.1f} MiB, measured {compute}"
        assert within(share.used / MIB, peak, PEAK_TOLERANCE), (
            f"peak {share.used / MIB:.1f} MiB, measured {peak}: {100 * (share.used / MIB - peak) / peak:+.3f} %, README promises 0.35 %"
        )
    assert shares[0].compute_point == FIRST_GPU_POINT[num_ctx][variant]
    if gpus == 2:
        assert shares[1].compute_point == "attention"


@pytest.mark.parametrize(("variant", "num_ctx", "gpus"), sorted(TRUTH))
def test_plans_the_real_maximum_on_24_gib_cards(models: Path, variant: str, num_ctx: int, gpus: int) -> None:
    folder = f"DeepSeek-R1-UD-{variant}"
    config = config_for(models, folder, (RTX_4090,) * gpus)
    result = run_builder("plan", "-c", str(config), "--num-ctx", str(num_ctx), "--json", cwd=models)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    count, peaks, one_more = TRUTH[(variant, num_ctx, gpus)]
    assert plan["num_gpu"] == count
    # each GPU's predicted peak is the measured one (TRUTH), within README's 0.35 %
    used = sorted(plan["gpus"], key=lambda gpu: gpu["cuda_position"])
    assert [len(gpu["layers"]) for gpu in used] == [-(-count // gpus), count // gpus][:gpus]
    for gpu, peak in zip(used, peaks, strict=True):
        assert within(gpu["used_bytes"] / MIB, peak, PEAK_TOLERANCE), (gpu["used_bytes"] / MIB, peak)
    # and so is its prediction for one layer more, which the measurements say does not fit
    shape = shape_of(models, variant)
    memory = [int(RTX_4090 * GIB)] * gpus
    layout = ollama_split.layout(shape, memory, count + 1, num_ctx)
    shares = sorted((s for s in shares_for(shape, memory, layout, num_ctx, 512) if s.position is not None), key=lambda s: s.position)
    assert [len(share.blocks) for share in shares] == [-(-(count + 1) // gpus), (count + 1) // gpus][:gpus]
    for share, peak in zip(shares, one_more, strict=True):
        assert within(share.used / MIB, peak, PEAK_TOLERANCE), (share.used / MIB, peak)


@pytest.mark.parametrize("variant", ["IQ1_S", "IQ1_M", "IQ2_XXS", "Q2_K_XL"])
def test_no_plan_predicts_a_peak_above_the_gpu(models: Path, variant: str) -> None:
    shape = shape_of(models, variant)
    for gpus in ((16,), (24,), (24, 24), (24, 48), (48, 24), (24, 48, 48), (80,), (80, 80), (141, 141)):
        for num_ctx in (512, 2048, 8192, 32768):
            for parallel in (1, 4):
                memory = [gib * GIB for gib in gpus]
                plan = plan_offload(shape, memory, num_ctx, GIB, parallel)
                used = sorted((share for share in plan.gpus if share.position is not None), key=lambda share: share.position)
                for share in plan.gpus:
                    if share.position is None:
                        assert share.used == 0 and not share.blocks
                held = [share.blocks for share in used]
                placed = [b for blocks in held for b in blocks]
                assert placed == list(range(61 - len(placed), 61))  # llama.cpp offloads the last layers, the first GPU the lowest
                assert plan.num_gpu == len(placed) + (plan.num_gpu > BLOCKS)
                # each GPU's peak recomputed from first principles leaves the margin free, and is the planner's
                truth = expected_gpus(variant, held, head_position(plan.num_gpu, plan.split), num_ctx * parallel)
                for share, expected in zip(used, truth, strict=True):
                    case = (gpus, num_ctx, parallel, share.index)
                    assert expected["peak"] + GIB <= share.memory, (case, expected)
                    assert (share.weights, share.kv_cache, share.compute, share.overhead) == (
                        expected["weights"], expected["kv"], expected["compute"], expected["overhead"]), (case, share, expected)


def test_a_mixed_pair_follows_ollama_and_the_per_gpu_model(models: Path) -> None:
    """24 + 48 GiB: no measurement exists; each GPU's prediction must be the
    one its position and blocks give on equal GPUs, which the table holds."""
    shape = shape_of(models, "IQ1_M")
    memory = [24 * GIB, 48 * GIB]
    # ollama first tries one GPU, the larger: its estimate fits 17 layers on the 48 alone
    alone = plan_offload(shape, memory, 2048)
    small, large = alone.gpus
    assert alone.num_gpu == 17 and small.position is None and small.used == 0
    assert (large.position, large.blocks) == (0, tuple(range(44, 61)))
    assert large.overhead == CUDA_CONTEXT_MIB["alone"] * MIB
    # the measured ngl 16 run on one GPU with one block more fits the 48 with the margin; two more do not
    truth = grow(43997, 1, "IQ1_M", 2048)
    assert within(large.used / MIB, truth, PEAK_TOLERANCE), (large.used / MIB, truth)
    assert truth + MARGIN_MIB <= 48 * 1024 < grow(43997, 2, "IQ1_M", 2048) + MARGIN_MIB
    # with OLLAMA_SCHED_SPREAD both, the 48 first (most memory), round-robin: 9 and 8
    spread = plan_offload(shape, memory, 2048, spread=True)
    small, large = spread.gpus
    assert spread.num_gpu == 17 and spread.split == (9, 8)
    assert (large.position, large.blocks) == (0, tuple(range(44, 53)))
    assert (small.position, small.blocks) == (1, tuple(range(53, 61)))
    # the 48 as first GPU with 9 blocks is the measured ngl 18 run's first GPU; the 24 with
    # 8 blocks second is the ngl 16 run's second GPU
    for share, (model, kv, compute, peak) in ((large, MEASURED[("IQ1_M", 18, 2048, 2)][0]), (small, MEASURED[("IQ1_M", 16, 2048, 2)][1])):
        assert (round(share.weights / MIB), share.kv_cache / MIB) == (model, kv)
        assert within(share.compute / MIB, compute, COMPUTE_TOLERANCE), (share.compute / MIB, compute)
        assert within(share.used / MIB, peak, PEAK_TOLERANCE), (share.used / MIB, peak)
    assert (large.overhead, small.overhead) == (CUDA_CONTEXT_MIB["first"] * MIB, CUDA_CONTEXT_MIB["other"] * MIB)
    # an 18th layer would be dealt to the 24, which has no room for a 9th block: blocks 52-60 second
    # are the ngl 18 run's second GPU, measured at 25139 MiB
    crowded = ollama_split.layout(shape, memory, 18, 2048, spread=True)
    assert crowded.split == (9, 9)
    assert crowded.blocks == (tuple(range(43, 52)), tuple(range(52, 61)))
    measured = MEASURED[("IQ1_M", 18, 2048, 2)][1][3]
    assert measured + MARGIN_MIB > 24 * 1024
    squeezed = shares_for(shape, memory, crowded, 2048, 512)[0]
    assert within(squeezed.used / MIB, measured, PEAK_TOLERANCE), (squeezed.used / MIB, measured)


def test_ollama_deals_two_equal_gpus_round_robin(models: Path) -> None:
    shape = shape_of(models, "IQ1_M")
    for num_gpu in (1, 15, 16, 30, 40):
        # OLLAMA_SCHED_SPREAD, else ollama puts up to 32 layers on one of two 80 GiB GPUs: its
        # estimate counts blocks 0-31, three of them small dense ones
        layout = ollama_split.layout(shape, [80 * GIB, 80 * GIB], num_gpu, 2048, spread=True)
        assert layout.gpus == (0, 1)
        first = -(-num_gpu // 2)
        assert layout.split == (first, num_gpu // 2)
        assert layout.blocks == (tuple(range(61 - num_gpu, 61 - num_gpu + first)), tuple(range(61 - num_gpu + first, 61)))
        assert ollama_split.layout(shape, [80 * GIB, 80 * GIB], num_gpu, 2048).gpus == ((0,) if num_gpu <= 32 else (0, 1))


@pytest.mark.parametrize(("folder", "gpus"), sorted(EXPECTED))
def test_plan_against_the_rule_of_thumb(models: Path, folder: str, gpus: tuple[int, ...]) -> None:
    config = config_for(models, folder, gpus)
    result = run_builder("plan", "-c", str(config), "--json", cwd=models)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    variant = folder.removeprefix("DeepSeek-R1-UD-")
    assert plan["model"]["architecture"] == "deepseek2" and plan["model"]["blocks"] == 61
    assert plan["model"]["total_bytes"] == total_bytes(folder) == sum(TENSOR_BYTES[variant].values())
    assert plan["model"]["block_bytes"] == list(BLOCK_BYTES[variant])
    num_gpu, rule = EXPECTED[(folder, gpus)]
    assert rule == rule_of_thumb(gpus, total_bytes(folder))
    assert (plan["num_gpu"], plan["unsloth_rule_of_thumb"]) == (num_gpu, rule)
    assert plan["kv_cache_per_layer_bytes"] == 2048 * 128 * (192 + 128) * 2
    for gpu, memory in zip(plan["gpus"], gpus, strict=True):
        assert gpu["memory_bytes"] == memory * GIB
    used = sorted((gpu for gpu in plan["gpus"] if gpu["cuda_position"] is not None), key=lambda gpu: gpu["cuda_position"])
    held = [tuple(gpu["layers"]) for gpu in used]
    placed = [b for blocks in held for b in blocks]
    # llama.cpp offloads the last layers, the first GPU the lowest of them.
    assert placed == list(range(61 - len(placed), 61))
    assert num_gpu == len(placed) + (num_gpu > BLOCKS)
    # every GPU's terms and peak as recomputed here, the margin free on each
    truth = expected_gpus(variant, held, head_position(num_gpu, plan["tensor_split"]), 2048)
    for gpu, expected in zip(used, truth, strict=True):
        assert (gpu["weights_bytes"], gpu["kv_cache_bytes"], gpu["compute_bytes"], gpu["overhead_bytes"], gpu["used_bytes"]) == (
            expected["weights"], expected["kv"], expected["compute"], expected["overhead"], expected["peak"])
        assert expected["peak"] + GIB <= gpu["memory_bytes"], "the margin must stay free"
    # and num_gpu is the largest: with one layer more, where ollama would put it, a GPU has no margin left
    if num_gpu < BLOCKS + 1:
        memory = [gib * GIB for gib in gpus]
        layout = ollama_split.layout(shape_of(models, variant), memory, num_gpu + 1, 2048)
        more = expected_gpus(variant, list(layout.blocks), head_position(num_gpu + 1, layout.split), 2048)
        assert any(expected["peak"] + GIB > memory[index] for index, expected in zip(layout.gpus, more, strict=True)), more


def test_text_plan_shows_the_split(models: Path) -> None:
    config = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24))
    result = run_builder("plan", "-c", str(config), cwd=models)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "model   deepseek2, 61 layers, 143.4 GiB"
    assert lines[1] == (
        "gpu 0   layers 45-52 (8): model 19934 + KV 1280 + compute 1037 (feed-forward of CPU layers) + CUDA 602 "
        "= peak 22853 of 24576 MiB (CUDA0)"
    )
    assert lines[2] == "gpu 1   layers 53-60 (8): model 19934 + KV 1280 + compute 670 (attention) + CUDA 533 = peak 22417 of 24576 MiB (CUDA1)"
    assert "num_gpu 16 of 61 layers on 2 GPU(s) (24 + 24 GiB): ollama 0.5.7 puts 8 on GPU 0, 8 on GPU 1" in lines[3]
    assert "Unsloth's rule of thumb says 15" in lines[3]


def test_text_plan_names_a_gpu_ollama_leaves_out(models: Path) -> None:
    config = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 48))
    lines = run_builder("plan", "-c", str(config), cwd=models).stdout.splitlines()
    assert lines[1] == "gpu 0   unused: ollama runs num_gpu 17 without it (24576 MiB)"
    assert lines[2].startswith("gpu 1   layers 44-60 (17): model 42361 + KV 2720 + compute 1037 (feed-forward of CPU layers) + CUDA 528")
    spread = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 48), extra="serve:\n  env:\n    OLLAMA_SCHED_SPREAD: 1\n")
    lines = run_builder("plan", "-c", str(spread), cwd=models).stdout.splitlines()
    assert lines[1].startswith("gpu 0   layers 53-60 (8): ") and lines[1].endswith("(CUDA1)")
    assert lines[2].startswith("gpu 1   layers 44-52 (9): ") and lines[2].endswith("(CUDA0)")


def test_auto_renders_a_number_and_says_why(models: Path) -> None:
    """The number goes to the create step, not into the image: rendered for
    other GPUs, the image's inputs are the same bytes (no rebuild), only the
    create step's BUILDER_NUM_GPU differs."""
    contexts = {}
    for gpus, layers in (((24, 24), 16), ((80, 80), 61)):
        config = config_for(models, "DeepSeek-R1-UD-IQ1_M", gpus)
        out = models / f"ctx-{gpus[0]}"
        result = run_builder("render", "-c", str(config), "--out", str(out), cwd=models)
        assert result.returncode == 0, result.stderr
        assert f"num_gpu: auto -> num_gpu {layers} of 61 layers" in result.stderr
        assert "memory from plan.gpu_memory_gib" in result.stderr
        compose = yaml.safe_load((out / "compose.yaml").read_text())
        assert compose["services"]["create"]["environment"] == {"BUILDER_NUM_GPU": str(layers)}
        modelfile = (out / "rootfs" / "etc" / "builder" / "Modelfile").read_text()
        assert "\nPARAMETER num_gpu" not in modelfile and "\n# PARAMETER num_gpu: auto;" in modelfile
        runtime = json.loads((out / "rootfs" / "etc" / "builder" / "runtime.json").read_text())
        assert runtime["create"]["parameters"]["num_gpu"] == "auto"
        contexts[gpus] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                          if p.is_file() and (p.name == "Dockerfile" or "rootfs" in p.parts)}
    assert contexts[(24, 24)] == contexts[(80, 80)], "the image does not depend on the GPUs"


def test_gpu_memory_flag_overrides(models: Path) -> None:
    config = config_for(models, "DeepSeek-R1-UD-IQ1_S", (24,))
    result = run_builder("plan", "-c", str(config), "--gpu-memory", "80,80", "--json", cwd=models)
    assert json.loads(result.stdout)["num_gpu"] == 62
    bad = run_builder("plan", "-c", str(config), "--gpu-memory", "24,lots", cwd=models)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --gpu-memory: expected GiB per GPU like 24,24, got '24,lots'"


def test_auto_without_gpu_memory_or_nvidia_smi(models: Path) -> None:
    config = config_for(models, "DeepSeek-R1-UD-IQ1_S", None)
    result = run_builder("render", "-c", str(config), cwd=models)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "plan.gpu_memory_gib: no GPU found (nvidia-smi is missing or sees none); give each GPU's memory, e.g. [24, 24]"
    )


def test_auto_with_gpus_none_is_zero(models: Path) -> None:
    config = config_for(models, "DeepSeek-R1-UD-IQ1_S", None, extra="gpus: none\n")
    result = run_builder("render", "-c", str(config), "--out", str(models / "ctx0"), cwd=models)
    assert result.returncode == 0, result.stderr
    assert "num_gpu: auto -> 0 (gpus: none)" in result.stderr
    compose = yaml.safe_load((models / "ctx0" / "compose.yaml").read_text())
    assert compose["services"]["create"]["environment"] == {"BUILDER_NUM_GPU": "0"}


def test_nfs_needs_a_place_to_read_the_headers(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "deepseek-r1-ud-iq1_m", cwd=tmp_path).returncode == 0
    result = run_builder("plan", "-c", "builder.yaml", "--gpu-memory", "24,24", cwd=tmp_path)
    assert result.returncode == 2
    assert "plan.shards_dir: the shards are on NFS: mount the export here and set plan.shards_dir" in result.stderr


def test_shards_flag_reads_a_mounted_export(models: Path, tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "deepseek-r1-ud-iq1_m", cwd=tmp_path).returncode == 0
    result = run_builder(
        "plan", "--shards", str(models / "models" / "DeepSeek-R1-UD-IQ1_M"), "--gpu-memory", "24,24", "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_gpu"] == 16


def test_plan_sizes_ollama_s_limits_to_the_model(models: Path) -> None:
    config = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24))
    result = run_builder("plan", "-c", str(config), cwd=models)
    assert result.returncode == 0, result.stderr
    size = total_bytes("DeepSeek-R1-UD-IQ1_M")  # the shards' tensors, from the fixture's shapes and types
    seconds = -(-size // 200_000_000)
    assert seconds > 600  # a 158 GB model read at NFS speed: far past ollama's 5 minutes
    assert f"ollama  OLLAMA_LOAD_TIMEOUT={seconds}s: {size / 1e9:.1f} GB read at 200 MB/s takes {seconds} s" in result.stdout
    assert "ollama  OLLAMA_NUM_PARALLEL=1: the model is above 16 GiB (serve.parallel: auto); the KV cache is num_ctx x 1" in result.stdout
    assert "ollama  OLLAMA_MAX_LOADED_MODELS=1: one model per stack" in result.stdout
    assert "ollama  OLLAMA_KEEP_ALIVE=-1: loaded for good once warmed up" in result.stdout
    data = json.loads(run_builder("plan", "-c", str(config), "--json", cwd=models).stdout)
    assert data["ollama_env"] == {"OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_LOAD_TIMEOUT": f"{seconds}s",
                                  "OLLAMA_MAX_LOADED_MODELS": "1", "OLLAMA_NUM_PARALLEL": "1"}
    slow = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24), extra="serve:\n  read_mb_s: 50\n")
    assert f"OLLAMA_LOAD_TIMEOUT={-(-size // 50_000_000)}s" in run_builder("plan", "-c", str(slow), cwd=models).stdout


def test_parallel_sequences_are_charged_in_the_kv_cache(models: Path) -> None:
    one = json.loads(run_builder("plan", "-c", str(config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24))), "--json", cwd=models).stdout)
    four_config = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24), extra="serve:\n  parallel: 4\n")
    four = json.loads(run_builder("plan", "-c", str(four_config), "--json", cwd=models).stdout)
    assert (one["parallel"], four["parallel"]) == (1, 4)
    assert one["kv_cache_per_layer_bytes"] == 2048 * KV_BYTES_PER_TOKEN
    assert four["kv_cache_per_layer_bytes"] == 4 * 2048 * KV_BYTES_PER_TOKEN
    # 4 x 2048 of context is the ngl 16 run at 8192: the measured maxima on 24 GiB cards (TRUTH)
    assert (one["num_gpu"], four["num_gpu"]) == (TRUTH[("IQ1_M", 2048, 2)][0], TRUTH[("IQ1_M", 8192, 2)][0]) == (16, 12)
    assert four["ollama_env"]["OLLAMA_NUM_PARALLEL"] == "4"


def test_a_num_gpu_above_the_plan_is_a_warning_with_the_numbers(tmp_path: Path) -> None:
    # validate checks the shards whole: make them their full length, sparse
    # (holes, no disk used), so only the headers hold bytes.
    from builder.supervisor.gguf import read_header_file

    models = tmp_path
    first = write_variant(models / "models", "DeepSeek-R1-UD-IQ1_M")
    for shard in first.parent.glob("*.gguf"):
        os.truncate(shard, read_header_file(str(shard)).expected_size)
    fits = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24), num_gpu="14")
    assert run_builder("validate", "-c", str(fits), cwd=models).returncode == 0
    crowded = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24), num_gpu="14", extra="serve:\n  env:\n    OLLAMA_NUM_PARALLEL: 4\n")
    # 4 x 2048 of context: the measured maximum on 24 GiB cards at 8192 (TRUTH), below 14
    four = TRUTH[("IQ1_M", 8192, 2)][0]
    assert json.loads(run_builder("plan", "-c", str(crowded), "--json", cwd=models).stdout)["num_gpu"] == four == 12
    # A number the user set is theirs (they may have seen it load): a warning
    # with the numbers, and ollama's load decides.
    result = run_builder("validate", "-c", str(crowded), cwd=models)
    assert result.returncode == 0, result.stderr
    assert (
        f"warning: model.parameters.num_gpu: 14 layers, but the plan fits {four} on the GPUs (24 + 24 GiB, from "
        "plan.gpu_memory_gib; KV cache for num_ctx 2048 x 4 parallel sequences (serve.env.OLLAMA_NUM_PARALLEL)); the load "
        "decides: if ollama runs out of GPU memory, `up` says so and leaves serve up; then lower OLLAMA_NUM_PARALLEL "
        f"(serve.parallel) or num_gpu to {four}"
    ) in result.stderr
    # With one sequence, no word about parallelism.
    over = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24), num_gpu="17")
    result = run_builder("validate", "-c", str(over), cwd=models)
    assert result.returncode == 0 and "but the plan fits 16 on the GPUs" in result.stderr, result.stderr
    assert "then set num_gpu to 16" in result.stderr and "PARALLEL" not in result.stderr


FAKE_SMI = """#!/bin/sh
# nvidia-smi as the test sets it: one GPU, its free memory and its compute processes
case "$1" in
  --query-gpu=*) echo "0, NVIDIA GeForce RTX 4090, 24564, $FAKE_FREE_MIB, GPU-fake-0" ;;
  --query-compute-apps=*) [ -n "$FAKE_APPS" ] && printf '%s\\n' "$FAKE_APPS" ;;
  *) exit 9 ;;
esac
"""


@pytest.fixture
def fake_smi(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_plans_from_free_memory_and_counts_its_own_runner_as_free(models: Path, fake_smi: dict[str, str]) -> None:
    """Another process holds 8 GiB of a 24 GB card: the plan is the one for
    the free 16 GiB, as ollama itself plans. A runner of this stack (its
    model is a blob of this stack's store) holding the same 8 GiB gives the
    memory back: redeploying must not plan around its own loaded model. A
    runner of another store's model does not."""
    import subprocess
    import sys

    config = config_for(models, "DeepSeek-R1-UD-IQ1_S", None)
    digest = "sha256-" + "ab" * 32

    def planned(env: dict[str, str], *args: str) -> dict:
        result = run_builder("plan", "-c", str(config), "--json", *args, cwd=models, env={**fake_smi, **env})
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    free = 24564 - 8192
    alone = planned({"FAKE_FREE_MIB": str(free)})
    assert alone["num_gpu"] == planned({}, "--gpu-memory", str(free / 1024))["num_gpu"]
    assert alone["gpus"][0]["memory_bytes"] == free * MIB
    assert alone["gpu_memory_source"].startswith(f"nvidia-smi free memory, as ollama plans (GPU 0 {free} of 24564 MiB free (8192 MiB held by other")
    whole = planned({}, "--gpu-memory", str(RTX_4090))["num_gpu"]
    assert whole > alone["num_gpu"]

    store = models / "models" / "ollama" / "blobs"
    store.mkdir(parents=True, exist_ok=True)
    (store / digest).write_bytes(b"")
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--model", str(store / digest)])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--model", f"/elsewhere/blobs/sha256-{'cd' * 32}"])
    # The same model in another stack's store on this machine: the same name, another file.
    twin_store = models / "twin" / "blobs"
    twin_store.mkdir(parents=True, exist_ok=True)
    (twin_store / digest).write_bytes(b"")
    twin = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--model", str(twin_store / digest)])
    try:
        ours = planned({"FAKE_FREE_MIB": str(free), "FAKE_APPS": f"{runner.pid}, GPU-fake-0, 8192"})
        assert ours["num_gpu"] == whole
        assert "+ 8192 MiB this stack's runner holds" in ours["gpu_memory_source"]
        theirs = planned({"FAKE_FREE_MIB": str(free), "FAKE_APPS": f"{other.pid}, GPU-fake-0, 8192"})
        assert theirs["num_gpu"] == alone["num_gpu"]
        twins = planned({"FAKE_FREE_MIB": str(free), "FAKE_APPS": f"{twin.pid}, GPU-fake-0, 8192"})
        assert twins["num_gpu"] == alone["num_gpu"]
    finally:
        for process in (runner, other, twin):
            process.kill()
            process.wait()
        (store / digest).unlink()
    text = run_builder("plan", "-c", str(config), cwd=models, env={**fake_smi, "FAKE_FREE_MIB": str(free)})
    assert "nvidia-smi free memory, as ollama plans" in text.stdout + text.stderr


def test_a_load_out_of_gpu_memory_says_what_was_tried_and_what_to_set(models: Path) -> None:
    """`up`'s line for a load that ran out of GPU memory (as ollama 0.5.7
    reported it on an H200 emulating a 24 GiB card with one layer too many,
    bench/gpu/raw/call2-h200): the num_gpu tried, the number to set, then
    ollama's words, cut to a line."""
    from builder.config import load_config
    from builder.preflight import assess
    from builder.preflight.sizing import plan_for
    from builder.targets import load_failure

    cause = ("llama runner process has terminated: cudaMalloc failed: out of memory; ggml_gallocr_reserve_n: failed to allocate "
             "CUDA0 buffer of size 1665652736" + "; more" * 80)
    planned = plan_for(load_config(config_for(models, "DeepSeek-R1-UD-IQ1_M", (24,))), shape_of(models, "IQ1_M"), [24 << 30]).num_gpu
    over = assess(load_config(config_for(models, "DeepSeek-R1-UD-IQ1_M", (24,), num_gpu=str(planned + 1))), whole=False)
    line = load_failure(over, cause, "builder logs --target host")
    assert line.startswith(
        f"r1 did not load with num_gpu {planned + 1}: out of GPU memory. Fix: set model.parameters.num_gpu to {planned} (or auto), "
        "what `builder plan` fits on the GPUs here. The stack is left up for `builder logs --target host`. "
        "ollama said: llama runner process has terminated: cudaMalloc failed"), line
    assert line.endswith("...") and "\n" not in line and len(line) < 700, line

    auto = assess(load_config(config_for(models, "DeepSeek-R1-UD-IQ1_M", (24,))), whole=False)
    line = load_failure(auto, cause, "builder logs")
    assert line.startswith(f"r1 did not load with num_gpu {planned} (auto): out of GPU memory. Fix: the plan ({planned} layers) "
                           "did not fit here: something else took GPU memory since, or the plan is wrong"), line
    assert f"raise plan.margin_gib or set model.parameters.num_gpu below {planned}" in line

    assert load_failure(auto, "error loading model: bad magic", "builder logs") == (
        "r1 did not load: error loading model: bad magic; the stack is left up for `builder logs`")


def test_a_stack_without_gpus_is_planned_for_the_cpu(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0  # gpus: none
    assert run_builder("sample-model", cwd=tmp_path).returncode == 0
    result = run_builder("plan", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("num_gpu 0 of 2 layers: no GPU, the model runs on the CPU; each layer's KV cache is "), lines
    assert not any(line.startswith(("gpu ", "memory from")) for line in lines), lines
    assert json.loads(run_builder("plan", "--json", cwd=tmp_path).stdout)["gpu_memory_source"] == "gpus: none"
