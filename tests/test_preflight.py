"""The preflight (issue 28): the model read once, the RAM and swap a load can
use (meminfo and cgroup v1/v2, the smaller), the RAM the plan needs, the
refusal before anything is written, the disk checks by file system, the
memory limits derived from the plan."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.preflight.disk import Need, NoSpace, check_space
from builder.preflight.machine import FreeSpace, read_system_memory
from builder.supervisor.gguf import read_header_file
from tests.fixtures.deepseek_headers import write_variant
from tests.helpers import run_builder

GIB = 1 << 30
MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\nSwapTotal:       4000000 kB\nSwapFree:        3000000 kB\n"


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    root = tmp_path / "root"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text(MEMINFO)
    (root / "proc" / "self" / "cgroup").write_text(cgroup)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_meminfo_alone_is_memavailable_and_swapfree(tmp_path: Path) -> None:
    memory = read_system_memory(fake_root(tmp_path, "0::/\n", {}))
    assert (memory.total, memory.available, memory.swap_free) == (24000000 * 1024, 20000000 * 1024, 3000000 * 1024)
    assert memory.source == "/proc/meminfo" and memory.cgroup_limit is None


def test_meminfo_without_memavailable_is_free_buffers_cached(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "0::/\n", {})
    (root / "proc" / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 30 kB\nSwapFree: 0 kB\n")
    assert read_system_memory(root).available == 150 * 1024


def test_a_cgroup_v1_limit_below_meminfo_wins(tmp_path: Path) -> None:
    group = "sys/fs/cgroup/memory/docker/abc"
    root = fake_root(tmp_path, "4:memory:/docker/abc\n0::/\n", {
        f"{group}/memory.limit_in_bytes": str(2 * GIB), f"{group}/memory.usage_in_bytes": str(GIB // 2),
        f"{group}/memory.stat": f"total_inactive_file {GIB // 4}\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
    })
    memory = read_system_memory(root)
    assert memory.cgroup_limit == 2 * GIB and memory.total == 2 * GIB
    # the limit less what is in use, the reclaimable page cache not counted as used
    assert memory.available == 2 * GIB - (GIB // 2 - GIB // 4)
    assert memory.source.startswith("cgroup v1 limit 2.0 GiB")
    assert memory.meminfo_available == 20000000 * 1024  # what ollama reads
    assert read_system_memory(root, cgroup=False).available == 20000000 * 1024


def test_a_cgroup_v2_limit_and_its_swap_limit(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "0::/\n", {
        "sys/fs/cgroup/memory.max": str(8 * GIB), "sys/fs/cgroup/memory.current": str(GIB),
        "sys/fs/cgroup/memory.stat": "inactive_file 0\n", "sys/fs/cgroup/memory.swap.max": str(GIB),
        "sys/fs/cgroup/memory.swap.current": "0",
    })
    memory = read_system_memory(root)
    assert (memory.available, memory.swap_free) == (7 * GIB, GIB)
    assert memory.source.startswith("cgroup v2 limit 8.0 GiB")


def test_a_cgroup_v2_without_a_limit_leaves_meminfo(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "0::/\n", {"sys/fs/cgroup/memory.max": "max", "sys/fs/cgroup/memory.current": str(GIB)})
    memory = read_system_memory(root)
    assert memory.available == 20000000 * 1024 and memory.cgroup_limit is None


def test_the_ram_need_is_what_the_headers_leave_on_the_cpu(tmp_path: Path) -> None:
    """Counted again here from the tensor table, by name: the CPU blocks are
    the first block_count - num_gpu, token_embd stays, the head stays too
    unless num_gpu passes block_count."""
    from builder.config import load_config
    from builder.preflight import assess, planned_ram
    from builder.preflight.sizing import PROCESS_ALLOWANCE

    first = write_variant(tmp_path / "models", "DeepSeek-R1-UD-IQ1_S")
    tensors = [t for shard in sorted(first.parent.glob("*.gguf")) for t in read_header_file(str(shard)).tensors]
    config_path = tmp_path / "b.yaml"
    config_path.write_text(f"version: 1\nmodel:\n  name: r1\n  shards: {first.parent.name}/{first.name}\n  parameters:\n"
                           "    num_gpu: 20\n    num_ctx: 2048\nstorage:\n  local: models\nplan:\n  gpu_memory_gib: [80, 80]\n  ram_gib: 64\n")
    config = load_config(str(config_path))
    preflight = assess(config, whole=False)
    need = preflight.ram
    cpu = [t for t in tensors if t.name.startswith("blk.") and int(t.name.split(".")[1]) < 61 - 20]
    stays = [t for t in tensors if t.name.startswith(("token_embd", "output"))]
    assert need.cpu_layers == 41 and need.weights == sum(t.nbytes for t in cpu + stays)
    kv_per_token_layer = 128 * (192 + 128) * 2  # R1: 128 heads, K 192 + V 128, f16
    assert need.kv_cache == 41 * 2048 * kv_per_token_layer
    assert need.total == need.weights + need.kv_cache + need.compute + PROCESS_ALLOWANCE
    assert preflight.system == planned_ram(config) and preflight.fits_in_ram is False  # about 90 GiB in 64


def sparse_r1(root: Path) -> Path:
    """IQ1_S's shards at their full length, holes beyond the headers (no disk used)."""
    first = write_variant(root / "models", "DeepSeek-R1-UD-IQ1_S")
    for shard in first.parent.glob("*.gguf"):
        os.truncate(shard, read_header_file(str(shard)).expected_size)
    return first


def test_plan_shows_the_ram_and_up_refuses_before_writing_anything(tmp_path: Path) -> None:
    first = sparse_r1(tmp_path)
    config = tmp_path / "builder.yaml"
    config.write_text(f"version: 1\nmodel:\n  name: r1\n  shards: {first.parent.name}/{first.name}\n  parameters:\n"
                      "    num_gpu: 10\n    num_ctx: 2048\nstorage:\n  local: models\ngpus: 2\nplan:\n  gpu_memory_gib: [24, 24]\n  ram_gib: 32\n"
                      "target: host\nhost:\n  prefix: ./prefix\n")
    plan = run_builder("plan", "-c", str(config), cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    ram = [line for line in plan.stdout.splitlines() if line.startswith("ram ")]
    assert "does NOT fit" in ram[0] and "has 32.0 GiB RAM + 0.0 GiB swap (plan.ram_gib)" in ram[0] and "num_gpu 10" in ram[0]
    assert "ollama 0.5.7 itself refuses only above MemAvailable + SwapFree" in ram[1]
    data = json.loads(run_builder("plan", "-c", str(config), "--json", cwd=tmp_path).stdout)["ram"]
    assert data["fits"] is False and data["needed_bytes"] > 32 * GIB and data["cpu_layers"] == 51
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    up = run_builder("up", "-c", str(config), "--offline", cwd=tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert up.returncode == 2
    errors = [line for line in up.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.parameters.num_gpu: the part of r1 that stays off the GPUs needs" in errors[0]
    assert f"{data['needed_bytes'] / GIB:.1f} GiB of RAM" in errors[0] and "32.0 GiB RAM + 0.0 GiB swap are free here (plan.ram_gib)" in errors[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no lock, prefix, cache or merged file
    doctor = run_builder("doctor", "-c", str(config), "--json", cwd=tmp_path)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["ram"]["status"] == "fail" and "does NOT fit" in checks["ram"]["detail"] and doctor.returncode == 1


def test_the_memory_limits_follow_the_plan_where_the_shards_are_read(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    assert run_builder("sample-model", cwd=tmp_path).returncode == 0
    assert run_builder("render", "--target", "kubernetes", cwd=tmp_path).returncode == 0
    compose = (tmp_path / "context" / "compose.yaml").read_text()
    plan = json.loads(run_builder("plan", "--json", "--gpu-memory", "24", cwd=tmp_path).stdout)["ram"]
    assert f'mem_limit: "{plan["memory_limit"].removesuffix("Gi")}g"' in compose
    manifest = (tmp_path / "context" / "kubernetes" / "deployment.yaml").read_text()
    assert f"memory: {plan['memory_limit']}" in manifest
    assert "plus 2 GiB (kubernetes.memory_limit: auto)" in (tmp_path / "context" / "kubernetes" / "NOTES.md").read_text()
    config = tmp_path / "builder.yaml"
    config.write_text(config.read_text().replace("serve:\n", "serve:\n  memory_limit: none\n", 1))
    assert run_builder("render", cwd=tmp_path).returncode == 0
    assert "mem_limit" not in (tmp_path / "context" / "compose.yaml").read_text()


def test_places_on_one_file_system_add_up_and_refuse_in_one_line(tmp_path: Path) -> None:
    def free(path: Path) -> FreeSpace:
        return FreeSpace(path, 1 if "data" in str(path) else 2, 3 * GIB)

    lines = check_space([Need("download", tmp_path / "cache", GIB), Need("image build", tmp_path / "data", 2 * GIB)], free)
    assert len(lines) == 2  # two file systems, each with room
    with pytest.raises(NoSpace) as caught:
        check_space([Need("download", tmp_path / "cache", 2 * GIB), Need("staged releases", tmp_path / "ctx", GIB)], free)
    message = str(caught.value)
    assert message.startswith("not enough disk space: download 2.00 GiB") and "staged releases 1.00 GiB" in message
    assert "need 3.25 GiB with 0.25 GiB slack, 3.00 GiB free there" in message


def test_the_preflight_reads_each_shard_header_once(tmp_path: Path, monkeypatch) -> None:
    """Loadability, num_gpu: auto, the parallelism check and the RAM need all
    come from one read of each header (they used to be parsed up to three times)."""
    from builder.config import load_config
    from builder.preflight import assess
    from builder.supervisor import gguf

    first = sparse_r1(tmp_path)
    config_path = tmp_path / "b.yaml"
    config_path.write_text(f"version: 1\nmodel:\n  name: r1\n  shards: {first.parent.name}/{first.name}\n  parameters:\n"
                           "    num_gpu: auto\n    num_ctx: 2048\nstorage:\n  local: models\ngpus: 2\nplan:\n  gpu_memory_gib: [24, 24]\n"
                           "serve:\n  env:\n    OLLAMA_NUM_PARALLEL: 1\n")
    reads: list[str] = []
    real = gguf.read_header
    monkeypatch.setattr(gguf, "read_header", lambda handle: reads.append(handle.name) or real(handle))
    preflight = assess(load_config(str(config_path)), system=read_system_memory())
    assert sorted(reads) == sorted(str(p) for p in first.parent.glob("*.gguf"))  # 3 shards, 3 reads
    assert isinstance(dict(preflight.config.model.parameters)["num_gpu"], int) and preflight.ram is not None
