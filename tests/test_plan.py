"""`builder plan` and `num_gpu: auto` on header-only shards shaped like the
four DeepSeek-R1 quants, compared with Unsloth's rule of thumb.

Where we differ from floor(VRAM_GB / model_GB x 61) - 4: the rule spreads the
model evenly over 61 layers and subtracts 4 layers as a blanket margin. We
place the layers llama.cpp really offloads (the last ones: all of them
mixture-of-experts, bigger than the average because the first 3 are dense),
and charge each its KV cache at num_ctx (160 MiB per layer at 2048 for
deepseek2's 128 heads x (192 + 128) f16), plus per GPU a compute buffer
(1.2 GiB), the CUDA context (0.5 GiB) and a 1 GiB margin. On one 24 GB card
that leaves room for 2-4 layers more than the rule; on 2 x 80 GB, a few
less for the larger quants, where the rule's even spread undercounts the
expert layers. Every plan is checked to leave the margin free on every GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.deepseek_headers import VARIANTS, write_variant
from tests.helpers import run_builder

# (variant, GPUs in GiB) -> (our num_gpu, Unsloth's rule of thumb)
EXPECTED = {
    ("DeepSeek-R1-UD-IQ1_S", (24,)): (9, 7),
    ("DeepSeek-R1-UD-IQ1_S", (80,)): (34, 33),
    ("DeepSeek-R1-UD-IQ1_S", (80, 80)): (62, 61),  # every block and the output layer
    ("DeepSeek-R1-UD-IQ1_M", (24,)): (8, 5),
    ("DeepSeek-R1-UD-IQ1_M", (24, 24)): (16, 14),  # the reference deployment ran 14 on 2 x 24 GB
    ("DeepSeek-R1-UD-IQ1_M", (80,)): (29, 26),
    ("DeepSeek-R1-UD-IQ2_XXS", (24,)): (6, 4),
    ("DeepSeek-R1-UD-IQ2_XXS", (80, 80)): (50, 49),
    ("DeepSeek-R1-UD-Q2_K_XL", (24,)): (6, 2),
    ("DeepSeek-R1-UD-Q2_K_XL", (80,)): (21, 19),
    ("DeepSeek-R1-UD-Q2_K_XL", (80, 80)): (42, 42),
}
GIB = 1 << 30


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("r1")
    for folder in VARIANTS:
        write_variant(root / "models", folder)
    return root


def config_for(root: Path, folder: str, gpus: tuple[int, ...] | None, num_gpu: str = "auto", extra: str = "") -> Path:
    _size, shards = VARIANTS[folder]
    memory = f"plan:\n  gpu_memory_gib: {list(gpus)}\n" if gpus else ""
    text = (
        f"version: 1\nmodel:\n  name: r1\n  shards: {folder}/{folder}-00001-of-{shards:05d}.gguf\n"
        f"  parameters:\n    num_gpu: {num_gpu}\n    num_ctx: 2048\n"
        f"storage:\n  local: models\n{memory}{extra}"
    )
    path = root / f"{folder}-{'-'.join(map(str, gpus or ()))}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("folder", "gpus"), sorted(EXPECTED))
def test_plan_against_the_rule_of_thumb(models: Path, folder: str, gpus: tuple[int, ...]) -> None:
    config = config_for(models, folder, gpus)
    result = run_builder("plan", "-c", str(config), "--json", cwd=models)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    size_gb, _ = VARIANTS[folder]
    assert plan["model"]["architecture"] == "deepseek2" and plan["model"]["blocks"] == 61
    assert abs(plan["model"]["total_bytes"] - size_gb * 10**9) < 10**6
    assert (plan["num_gpu"], plan["unsloth_rule_of_thumb"]) == EXPECTED[(folder, gpus)]
    assert plan["kv_cache_per_layer_bytes"] == 2048 * 128 * (192 + 128) * 2
    placed = []
    for gpu, memory in zip(plan["gpus"], gpus):
        assert gpu["memory_bytes"] == memory * GIB
        assert gpu["used_bytes"] == gpu["weights_bytes"] + gpu["kv_cache_bytes"] + gpu["compute_bytes"] + gpu["overhead_bytes"]
        assert gpu["spare_bytes"] >= plan["margin_per_gpu_bytes"], "the margin must stay free"
        blocks = plan["model"]["block_bytes"]
        assert gpu["kv_cache_bytes"] == len(gpu["layers"]) * plan["kv_cache_per_layer_bytes"]
        assert gpu["weights_bytes"] >= sum(blocks[i] for i in gpu["layers"])
        placed += gpu["layers"]
    # llama.cpp offloads the last layers.
    assert sorted(placed) == list(range(61 - len(placed), 61))
    assert plan["num_gpu"] in (len(placed), len(placed) + 1)


def test_text_plan_shows_the_split(models: Path) -> None:
    config = config_for(models, "DeepSeek-R1-UD-IQ1_M", (24, 24))
    result = run_builder("plan", "-c", str(config), cwd=models)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "model   deepseek2, 61 layers, 147.1 GiB"
    assert lines[1].startswith("gpu 0   layers 53-60 (8): weights 20.0 + kv 1.25")
    assert lines[2].startswith("gpu 1   layers 45-52 (8): ")
    assert "num_gpu 16 of 61 layers on 2 GPU(s) (24 + 24 GiB)" in lines[3]
    assert "Unsloth's rule of thumb says 14" in lines[3]


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
