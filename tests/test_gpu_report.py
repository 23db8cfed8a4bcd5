"""The host target and the GPU. `up` and `status` say how much GPU memory
the runner really holds, as nvidia-smi counts it per process, beside
ollama's estimate (/api/ps size_vram, computed before the load: 8.6 GiB
where the runner held 14.5 on an H100, bench/gpu/RESULTS.md): the host
target with the ollama double (real llama.cpp runner) and an nvidia-smi
that lists the running runner processes, as the real one lists CUDA
processes; the runner is told apart by its model, a blob of this stack's
store (or of the model cache). And ollama gets the machine's
LD_LIBRARY_PATH, along which it looks for CUDA's libraries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.test_host_target import HostProject
from tests.test_host_target import project as project  # noqa: F401 - the fixture

HELD_MIB = 14848
FAKE_SMI = f"""#!/bin/sh
# nvidia-smi as the test sets it: one H100, every ollama runner holding {HELD_MIB} MiB of it
case "$1" in
  --query-gpu=*) echo "0, NVIDIA H100 80GB HBM3, 81559, 60000, GPU-fake-0" ;;
  --query-compute-apps=*) for pid in $(pgrep -f -- '--model .*sha256-'); do echo "$pid, GPU-fake-0, {HELD_MIB}"; done ;;
  *) exit 9 ;;
esac
"""


@pytest.mark.parametrize("cache", [False, True], ids=["store on the model volume", "store in the model cache"])
def test_up_and_status_report_what_the_runner_holds(project: HostProject, tmp_path: Path, cache: bool) -> None:
    smi = tmp_path / "smi"
    smi.mkdir()
    (smi / "nvidia-smi").write_text(FAKE_SMI)
    (smi / "nvidia-smi").chmod(0o755)
    project.env["PATH"] = f"{smi}:{os.environ['PATH']}"
    config = project.root / "builder.yaml"
    data = yaml.safe_load(config.read_text())
    data["gpus"] = "all"
    if cache:
        data["storage"]["model_cache"] = "./node-cache"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    assert project.builder("sample-model").returncode == 0

    up = project.builder("up")
    assert up.returncode == 0, up.stderr[-3000:]
    loaded = next(line for line in up.stderr.splitlines() if "load: tiny:latest loaded in " in line)
    assert "14.5 GiB held in GPU memory (nvidia-smi; ollama estimated " in loaded, loaded

    status = json.loads(project.builder("status", "--json").stdout)
    assert status["loaded"]["gpu_held"] == HELD_MIB << 20, status["loaded"]
    text = project.builder("status").stdout
    assert "14.5 GiB held in GPU memory (nvidia-smi; ollama estimated" in text, text

    # Without the runner in nvidia-smi's list (another machine's, or no GPU
    # process), the estimate is named as ollama's.
    apps = next(line for line in FAKE_SMI.splitlines() if "--query-compute-apps" in line)
    (smi / "nvidia-smi").write_text(FAKE_SMI.replace(apps, "  --query-compute-apps=*) ;;"))
    text = project.builder("status").stdout
    assert "in GPU memory (ollama's estimate)" in text and "nvidia-smi;" not in text, text


def test_the_host_target_hands_ollama_the_machine_s_library_path(project: HostProject) -> None:
    """ollama finds libcuda and libcudart along LD_LIBRARY_PATH too; on a
    machine whose CUDA is found only through it, the host target's ollama
    must get it (not llama.cpp's folder, which the supervisor sets for its
    own tools, and not nothing)."""
    cuda = project.root / "cuda-here" / "lib64"
    cuda.mkdir(parents=True)
    project.env["LD_LIBRARY_PATH"] = str(cuda)
    assert project.builder("sample-model").returncode == 0
    up = project.builder("up", "--no-load")
    assert up.returncode == 0, up.stderr[-3000:]
    supervisor = project.pid()
    children = [int(p) for p in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    servers = [pid for pid in children if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert servers, f"no ollama serve among the supervisor's children {children}"
    environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{servers[0]}/environ").read_bytes().split(b"\0") if b"=" in item)
    assert environ.get(b"LD_LIBRARY_PATH") == str(cuda).encode(), environ.get(b"LD_LIBRARY_PATH")
    assert b"BUILDER_OLLAMA_LD_LIBRARY_PATH" not in environ


def test_ollama_s_gpu_figure_is_named_for_what_it_is() -> None:
    """ollama 0.5.7's /api/ps size_vram is its estimate before the load;
    0.30+'s is the buffers llama-server logged (seen on a real 0.32.15, an
    H100: 20311.64 MiB = model + KV + compute, nvidia-smi 0.6 GiB more)."""
    from builder.targets.common import gpu_words

    gib = 1 << 30
    assert gpu_words(8 * gib, "30%", 14 * gib) == "14.0 GiB held in GPU memory (nvidia-smi; ollama estimated 8.0 GiB, 30% of the model)"
    assert gpu_words(20 * gib, "61%", 21 * gib, current=True) == \
        "21.0 GiB held in GPU memory (nvidia-smi; llama-server's GPU buffers 20.0 GiB per ollama, 61% of its size)"
    assert gpu_words(20 * gib, "61%", None, current=True) == "20.0 GiB (61%) in GPU memory (llama-server's buffers, per ollama)"
    assert "estimate" not in gpu_words(20 * gib, "61%", None, current=True)
