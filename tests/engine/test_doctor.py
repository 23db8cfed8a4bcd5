"""`builder doctor` on this kind of machine: an engine, no GPU, no NFS client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_builder

pytestmark = pytest.mark.engine


def test_doctor_tiny_is_healthy_once_the_shards_are_there(tmp_path: Path, docker_engine) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    before = run_builder("doctor", cwd=tmp_path)
    assert before.returncode == 1
    assert f"fail  storage: local folder {tmp_path}/models does not exist -> mkdir -p {tmp_path}/models" in before.stdout
    assert run_builder("sample-model", cwd=tmp_path).returncode == 0
    result = run_builder("doctor", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["engine"]["status"] == "ok" and checks["engine"]["detail"].startswith("Docker 26.")
    assert checks["buildx"]["status"] == "ok" and checks["compose"]["status"] == "ok"
    assert checks["gpu"] == {"name": "gpu", "status": "ok", "detail": "not needed (gpus: none)", "fix": ""}
    assert checks["shards"]["status"] == "ok" and "intact" in checks["shards"]["detail"]
    assert checks["space"]["status"] == "ok"
    assert checks["image"]["status"] in ("ok", "warn")


def test_doctor_says_there_is_no_gpu_and_no_nfs_here(tmp_path: Path, docker_engine) -> None:
    assert run_builder("init", "--preset", "deepseek-r1-ud-iq1_m", cwd=tmp_path).returncode == 0
    result = run_builder("doctor", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok    engine: Docker 26.")
    assert "fail  nvidia-toolkit: neither the nvidia runtime nor an NVIDIA CDI spec is configured -> install nvidia-container-toolkit" in result.stdout
    assert "fail  gpus: nvidia-smi is missing or sees no GPU -> install the NVIDIA driver" in result.stdout
    assert "fail  nfs-server: 192.0.2.10:2049 does not answer" in result.stdout
    assert "fail  nfs-client: this kernel has no NFS client, so Docker cannot mount the volume" in result.stdout
    assert "warn  shards: on NFS, not readable from here" in result.stdout
    assert lines[-1].startswith("warn  image: builder-deepseek-r1:ud-iq1-m is not built yet") or lines[-1].startswith("warn  image: builder-deepseek-r1:ud-iq1-m was built")
