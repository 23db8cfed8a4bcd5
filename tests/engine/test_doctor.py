"""`builder doctor` on this kind of machine: an engine, no GPU, no NFS client."""

from __future__ import annotations

import json
import socket
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


def _nfs_preset_on_loopback(tmp_path: Path, port: int) -> None:
    """The R1 preset with its NFS server moved to 127.0.0.1:PORT (the `port=`
    mount option), where the test decides what answers: no test traffic may
    leave loopback, and the preset's placeholder 192.0.2.10 is not ours."""
    assert run_builder("init", "--preset", "deepseek-r1-ud-iq1_m", cwd=tmp_path).returncode == 0
    config = tmp_path / "builder.yaml"
    text = config.read_text(encoding="utf-8")
    nfs = "    server: 192.0.2.10\n    export: /export/models\n    options: rw,nfsvers=4.1,hard\n"
    assert nfs in text
    ours = f"    server: 127.0.0.1\n    export: /export/models\n    options: rw,nfsvers=4.1,hard,port={port}\n"
    config.write_text(text.replace(nfs, ours), encoding="utf-8")


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again: nothing listens there


def machine_has() -> dict[str, bool]:
    """What this machine has, read here independently of builder: the NVIDIA
    runtime or a CDI spec in the engine, a GPU nvidia-smi lists, an NFS client."""
    import glob
    import os
    import shutil
    import subprocess

    info = json.loads(subprocess.run(["docker", "info", "--format", "{{json .}}"], capture_output=True, text=True, check=True).stdout)
    cdi = [p for d in (info.get("CDISpecDirs") or ["/etc/cdi", "/var/run/cdi"]) for p in glob.glob(f"{d}/*.yaml") if "nvidia" in os.path.basename(p)]
    smi = shutil.which("nvidia-smi")
    listed = smi and subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip()
    kernel = os.uname().release
    nfs = "nfs" in open("/proc/filesystems").read() or any(os.path.exists(f"/lib/modules/{kernel}/kernel/fs/{n}") for n in ("nfs", "nfs_common"))
    return {"toolkit": "nvidia" in (info.get("Runtimes") or {}) or bool(cdi), "gpu": bool(listed), "nfs": nfs}


def test_doctor_reports_the_gpus_and_nfs_this_machine_has(tmp_path: Path, docker_engine) -> None:
    port = _unused_port()
    _nfs_preset_on_loopback(tmp_path, port)
    result = run_builder("doctor", cwd=tmp_path)
    assert result.returncode == 1  # the NFS server on an unused port fails on any machine
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok    engine: Docker 26.")
    has = machine_has()
    if has["toolkit"]:
        assert "ok    nvidia-toolkit: configured: " in result.stdout
    else:
        assert "fail  nvidia-toolkit: neither the nvidia runtime nor an NVIDIA CDI spec is configured -> install nvidia-container-toolkit" in result.stdout
    if has["gpu"]:
        assert next(line for line in lines if "gpus: " in line).startswith("ok    gpus: 0: ")
    else:
        assert "fail  gpus: nvidia-smi is missing or sees no GPU -> install the NVIDIA driver" in result.stdout
    assert f"fail  nfs-server: 127.0.0.1:{port} does not answer (Connection refused) -> check storage.nfs.server, the server's nfsd and the firewall (TCP {port})" in result.stdout
    if has["nfs"]:
        assert "warn  nfs-client: cannot test-mount 127.0.0.1:/export/models from here; the first `up` will" in result.stdout
    else:
        assert "fail  nfs-client: this kernel has no NFS client, so Docker cannot mount the volume" in result.stdout
    assert "warn  shards: on NFS, not readable from here" in result.stdout
    assert lines[-1].startswith("warn  image: builder-deepseek-r1:ud-iq1-m is not built yet") or lines[-1].startswith("warn  image: builder-deepseek-r1:ud-iq1-m was built")


def test_doctor_sees_an_nfs_server_that_answers(tmp_path: Path, docker_engine) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        _nfs_preset_on_loopback(tmp_path, port)
        result = run_builder("doctor", "--json", cwd=tmp_path)
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["nfs-server"] == {"name": "nfs-server", "status": "ok", "detail": f"127.0.0.1:{port} answers", "fix": ""}
