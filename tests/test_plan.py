"""`builder plan` and `num_gpu: auto` on header-only shards laid out like the
four DeepSeek-R1 quants (tests/fixtures/deepseek_headers.py), held to real
GPU measurements and compared with Unsloth's rule of thumb.

The measurements (README, "num_gpu: auto and builder plan"): llama.cpp b4610
with CUDA on two 141 GB H200s, `-sm layer -b 512 -ub 512`, shards of this
layout, peak per GPU from nvidia-smi. Every row is reproduced within 3 % on
the peak (model and KV buffers to the MiB), and the layer counts they imply
for 24 GiB cards (an RTX 4090 reports 24564 MiB) are the ones planned.

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
margin free on every GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.render import ollama_split
from builder.render.offload import MIB, ModelShape, model_shape, plan_offload, shares_for
from builder.supervisor.gguf import read_header_file
from tests.fixtures.deepseek_headers import VARIANTS, total_bytes, write_variant
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

# The H200 measurements (MiB), per GPU in device order:
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
# What the first GPU's compute buffer is made of in each run (builder/render/offload.py)
FIRST_GPU_POINT = {2048: {"IQ1_M": "feed-forward of CPU layers", "IQ1_S": "output head from the CPU"},
                   4096: {"IQ1_M": "attention of CPU layers"}, 8192: {"IQ1_M": "attention of CPU layers"}}
# The most layers two (or one) 24564 MiB cards hold with 1 GiB to spare, worked
# out from the table: IQ1_M at 2048 from the ngl 16 and 18 runs (17 puts 9
# blocks on the first GPU, as 18 does: 25501 MiB); one card from the ngl 8 run.
TRUTH = {
    ("IQ1_M", 2048, 2): 16,
    ("IQ1_M", 4096, 2): 14,
    ("IQ1_M", 8192, 2): 12,
    ("IQ1_S", 2048, 2): 18,
    ("IQ1_M", 2048, 1): 8,
}


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
def test_every_measured_row_within_3_percent(models: Path, row: tuple[str, int, int, int]) -> None:
    variant, ngl, num_ctx, gpus = row
    shape = shape_of(models, variant)
    # the runs split the layers evenly (llama.cpp's default between equal GPUs)
    blocks, output = ollama_split.llama_blocks(shape.block_count, ngl, [1] * gpus)
    layout = ollama_split.Layout(tuple(range(gpus)), (1,) * gpus, blocks, output)
    shares = shares_for(shape, [H200] * gpus, layout, num_ctx, 512)
    for share, (model, kv, compute, peak) in zip(shares, MEASURED[row], strict=True):
        assert round(share.weights / MIB) == model
        assert share.kv_cache / MIB == kv
        assert abs(share.compute / MIB - compute) <= 0.01 * compute, (share.compute / MIB, compute)
        assert abs(share.used / MIB - peak) <= 0.03 * peak, (share.used / MIB, peak)
    first = shares[0]
    assert first.compute_point == FIRST_GPU_POINT[num_ctx][variant]
    if gpus == 2:
        assert shares[1].compute_point == "attention"
        assert shares[0].blocks[-1] + 1 == shares[1].blocks[0]  # the first GPU holds the lower blocks


@pytest.mark.parametrize(("variant", "num_ctx", "gpus"), sorted(TRUTH))
def test_plans_the_real_maximum_on_24_gib_cards(models: Path, variant: str, num_ctx: int, gpus: int) -> None:
    folder = f"DeepSeek-R1-UD-{variant}"
    config = config_for(models, folder, (RTX_4090,) * gpus)
    result = run_builder("plan", "-c", str(config), "--num-ctx", str(num_ctx), "--json", cwd=models)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["num_gpu"] == TRUTH[(variant, num_ctx, gpus)]
    for gpu in plan["gpus"]:
        assert gpu["spare_bytes"] >= plan["margin_per_gpu_bytes"]
    # one layer more does not fit: the plan is the largest
    shape = shape_of(models, variant)
    memory = [int(RTX_4090 * GIB)] * gpus
    layout = ollama_split.layout(shape, memory, plan["num_gpu"] + 1, num_ctx)
    assert any(share.spare < GIB for share in shares_for(shape, memory, layout, num_ctx, 512) if share.position is not None)


@pytest.mark.parametrize("variant", ["IQ1_S", "IQ1_M", "IQ2_XXS", "Q2_K_XL"])
def test_no_plan_predicts_a_peak_above_the_gpu(models: Path, variant: str) -> None:
    shape = shape_of(models, variant)
    for gpus in ((16,), (24,), (24, 24), (24, 48), (48, 24), (24, 48, 48), (80,), (80, 80), (141, 141)):
        for num_ctx in (512, 2048, 8192, 32768):
            for parallel in (1, 4):
                memory = [gib * GIB for gib in gpus]
                plan = plan_offload(shape, memory, num_ctx, GIB, parallel)
                for share in plan.gpus:
                    assert share.used + GIB <= share.memory or share.position is None, (gpus, num_ctx, parallel, share)
                    if share.position is None:
                        assert share.used == 0 and not share.blocks
                placed = sorted(b for share in plan.gpus for b in share.blocks)
                assert placed == list(range(61 - len(placed), 61))  # llama.cpp offloads the last layers
                assert plan.num_gpu in (len(placed), len(placed) + 1)


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
    assert large.overhead == 528 * MIB and large.used + GIB <= large.memory
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
        assert abs(share.used / MIB - peak) <= 0.03 * peak
    equal = plan_offload(shape, [24 * GIB, 24 * GIB], 2048)
    assert small.compute == equal.gpus[1].compute and small.overhead == equal.gpus[1].overhead
    # an 18th layer would be dealt to the 24, which has no room for a 9th block
    crowded = ollama_split.layout(shape, memory, 18, 2048, spread=True)
    assert crowded.split == (9, 9)
    assert shares_for(shape, memory, crowded, 2048, 512)[0].spare < GIB


def test_ollama_deals_two_equal_gpus_round_robin(models: Path) -> None:
    shape = shape_of(models, "IQ1_M")
    for num_gpu in (1, 15, 16, 30, 40):
        # OLLAMA_SCHED_SPREAD, else ollama puts up to 32 layers on one of two 80 GiB GPUs: its
        # estimate counts blocks 0-31, three of them small dense ones
        layout = ollama_split.layout(shape, [80 * GIB, 80 * GIB], num_gpu, 2048, spread=True)
        assert layout.gpus == (0, 1)
        assert layout.split == (-(-num_gpu // 2), num_gpu // 2)
        assert tuple(len(b) for b in layout.blocks) == layout.split
        assert layout.blocks[0] + layout.blocks[1] == tuple(range(61 - num_gpu, 61))
        assert ollama_split.layout(shape, [80 * GIB, 80 * GIB], num_gpu, 2048).gpus == ((0,) if num_gpu <= 32 else (0, 1))


@pytest.mark.parametrize(("folder", "gpus"), sorted(EXPECTED))
def test_plan_against_the_rule_of_thumb(models: Path, folder: str, gpus: tuple[int, ...]) -> None:
    config = config_for(models, folder, gpus)
    result = run_builder("plan", "-c", str(config), "--json", cwd=models)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["model"]["architecture"] == "deepseek2" and plan["model"]["blocks"] == 61
    assert plan["model"]["total_bytes"] == total_bytes(folder)
    assert (plan["num_gpu"], plan["unsloth_rule_of_thumb"]) == EXPECTED[(folder, gpus)]
    assert plan["kv_cache_per_layer_bytes"] == 2048 * 128 * (192 + 128) * 2
    placed = []
    for gpu, memory in zip(plan["gpus"], gpus, strict=True):
        assert gpu["memory_bytes"] == memory * GIB
        assert gpu["used_bytes"] == gpu["weights_bytes"] + gpu["kv_cache_bytes"] + gpu["compute_bytes"] + gpu["overhead_bytes"]
        assert gpu["spare_bytes"] >= plan["margin_per_gpu_bytes"], "the margin must stay free"
        blocks = plan["model"]["block_bytes"]
        assert gpu["kv_cache_bytes"] == len(gpu["layers"]) * plan["kv_cache_per_layer_bytes"]
        assert gpu["weights_bytes"] >= sum(blocks[i] for i in gpu["layers"])
        placed += gpu["layers"]
    # llama.cpp offloads the last layers, the first GPU the lowest of them.
    assert placed == list(range(61 - len(placed), 61))
    assert plan["num_gpu"] in (len(placed), len(placed) + 1)


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
    config = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24))
    result = run_builder("render", "-c", str(config), "--out", str(models / "ctx"), cwd=models)
    assert result.returncode == 0, result.stderr
    modelfile = (models / "ctx" / "rootfs" / "etc" / "builder" / "Modelfile").read_text()
    assert "PARAMETER num_gpu 16\n" in modelfile
    assert "num_gpu: auto -> num_gpu 16 of 61 layers" in result.stderr
    assert "memory from plan.gpu_memory_gib" in result.stderr


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
    assert "PARAMETER num_gpu 0\n" in (models / "ctx0" / "rootfs" / "etc" / "builder" / "Modelfile").read_text()


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
    size = json.loads(run_builder("plan", "-c", str(config), "--json", cwd=models).stdout)["model"]["total_bytes"]
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
    assert four["kv_cache_per_layer_bytes"] == 4 * one["kv_cache_per_layer_bytes"]
    assert four["num_gpu"] < one["num_gpu"]
    assert four["ollama_env"]["OLLAMA_NUM_PARALLEL"] == "4"


def test_a_parallelism_that_breaks_the_plan_is_a_config_error(tmp_path: Path) -> None:
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
    four = json.loads(run_builder("plan", "-c", str(crowded), "--json", cwd=models).stdout)["num_gpu"]
    assert four < 14
    result = run_builder("validate", "-c", str(crowded), cwd=models)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {crowded}: serve.env.OLLAMA_NUM_PARALLEL: 4 parallel sequences make the KV cache num_ctx 2048 x 4: "
        f"only {four} layers fit on the GPUs (24 + 24 GiB, from plan.gpu_memory_gib) but model.parameters.num_gpu is 14; "
        f"lower OLLAMA_NUM_PARALLEL (serve.env or serve.parallel) or set num_gpu to {four}"
    )
