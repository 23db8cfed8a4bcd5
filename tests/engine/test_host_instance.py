"""The host target where it is meant to run: inside a container that has no
Docker (an AutoDL or Cloudpods instance), with builder installed from a
wheelhouse, no network at all, the release archives carried in, the model
storage on a bind mount; as root and as an ordinary user."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.engine.conftest import docker
from tests.fixtures.llama_cpp_release import default_cache_dir, llama_cpp_release_zip
from tests.fixtures.ollama_release import ollama_release_tgz
from tests.helpers import registry_client_env

pytestmark = pytest.mark.engine

SCRIPT = r"""
set -eu
export PYTHONPATH=/opt/builder-pkgs HOME=/tmp/home-$(id -u)
mkdir -p "$HOME"
cd /work
python3 -m builder init --preset tiny
printf 'target: host\nhost:\n  prefix: ./prefix\n' >> builder.yaml
python3 -m builder sample-model
python3 -m builder up --offline --from /carried 2>&1 | tail -n 5
python3 -c '
import json, urllib.request
body = json.dumps({"model": "tiny", "prompt": "Why is the sky blue?", "stream": False, "options": {"num_predict": 8}}).encode()
with urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:11434/api/generate", data=body), timeout=120) as r:
    answer = json.loads(r.read())
print("ANSWER", answer["eval_count"], json.dumps(answer["response"]))
'
python3 -m builder status --json > status.json
python3 -m builder up --offline --from /carried 2>&1 | grep -c "already running with this config"
python3 -m builder logs | grep -c "serve: tiny:latest loaded in"
python3 -m builder down
test -f models/tiny/tiny.gguf && echo MODEL-KEPT
ls /var/run/docker.sock 2>/dev/null || echo NO-DOCKER-SOCKET
"""


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """builder's wheel and its dependencies' (pip downloads those once, from
    PyPI, into the test cache), and pip's own wheel to install them with."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    deps = default_cache_dir().parent / f"wheelhouse-py{sys.version_info[0]}{sys.version_info[1]}-{key}"
    if not (deps / ".complete").is_file():
        shutil.rmtree(deps, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(deps), str(REPO), "pip"],
                       check=True, capture_output=True, env=registry_client_env())
        (deps / ".complete").write_text("")
    folder = tmp_path_factory.mktemp("wheels")
    for wheel in deps.glob("*.whl"):
        if not wheel.name.startswith("gguf_builder-"):
            shutil.copy(wheel, folder)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder), str(REPO)],
                   check=True, capture_output=True, env=registry_client_env())
    return folder


@pytest.mark.parametrize("user", ["root", "1000:1000"])
def test_up_on_the_host_target_inside_an_instance_without_docker(user: str, tiny_stack, wheelhouse: Path, tmp_path: Path) -> None:
    assert tiny_stack.builder("base").returncode == 0
    base = tiny_stack.builder("base").stdout.split()[0]
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "ollama-linux-amd64.tgz").write_bytes(ollama_release_tgz())
    (carried / "llama-b4610-bin-ubuntu-x64.zip").write_bytes(llama_cpp_release_zip().read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)
    for folder in (tmp_path, carried):
        folder.chmod(0o755)
    pkgs = tmp_path / "pkgs"
    install = docker(
        "run", "--rm", "--network", "none", "-v", f"{wheelhouse}:/wheels:ro", "-v", f"{pkgs}:/opt/builder-pkgs", base,
        "sh", "-c", "python3 \"$(ls /wheels/pip-*.whl)/pip\" install -q --no-index --find-links /wheels --target /opt/builder-pkgs gguf-builder"
        " && chmod -R a+rX /opt/builder-pkgs",
        check=False, timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    result = docker(
        "run", "--rm", "--network", "none", "--user", user, "-v", f"{pkgs}:/opt/builder-pkgs:ro",
        "-v", f"{carried}:/carried:ro", "-v", f"{work}:/work", base, "sh", "-c", SCRIPT,
        check=False, timeout=900,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "http://127.0.0.1:11434 serves tiny:latest" in out
    answer = next(line for line in out.splitlines() if line.startswith("ANSWER "))
    assert answer.split()[1] == "8"
    lines = out.splitlines()
    assert lines[lines.index(answer) + 1] == "1", "the second up changed nothing"
    assert lines[lines.index(answer) + 2] == "1", "the log shows the load"
    assert "MODEL-KEPT" in out and "NO-DOCKER-SOCKET" in out
    status = json.loads((work / "status.json").read_text())
    assert status["target"] == "host" and status["services"]["serve"]["state"] == "running" and status["loaded"]


FIRST_COMMAND = r"""
set -u
cd /work
python3 -m venv --without-pip .venv
.venv/bin/python "$(ls /wheels/pip-*.whl)/pip" install -q --no-index --find-links /wheels gguf-builder || exit 90
. .venv/bin/activate && builder init --preset tiny && builder sample-model && builder up
echo "EXIT $?"
"""


def test_the_first_readme_command_from_apt_s_python_stops_at_the_missing_engine(tiny_stack, wheelhouse: Path, tmp_path: Path) -> None:
    """Debian's own python3 (no pip, PEP 668): the README's venv route works
    and gets as far as one clear line about the engine this machine lacks."""
    assert tiny_stack.builder("base").returncode == 0
    base = tiny_stack.builder("base").stdout.split()[0]
    work = tmp_path / "work"
    work.mkdir()
    result = docker("run", "--rm", "--network", "none", "-v", f"{wheelhouse}:/wheels:ro", "-v", f"{work}:/work", base,
                    "sh", "-c", FIRST_COMMAND, check=False, timeout=600)
    out = result.stdout + result.stderr
    assert "EXIT 1" in out, out[-3000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == ["error: cannot reach the Docker engine at unix:///var/run/docker.sock: the socket does not exist (no engine runs); start dockerd, or set DOCKER_HOST"], out[-2000:]
    assert (work / "models" / "tiny" / "tiny-00001-of-00003.gguf").is_file()


MEMORY_LIMITED = r"""
set -u
export PYTHONPATH=/opt/builder-pkgs HOME=/work/home
cd /work
python3 -m builder plan 2>&1 | grep '^ram'
python3 -m builder up --offline --from /carried; echo "EXIT $?"
"""


def test_a_container_memory_limit_refuses_the_plan_before_anything_is_written(tiny_stack, wheelhouse: Path, tmp_path: Path) -> None:
    """A real cgroup limit (`docker run --memory 2g`): /proc/meminfo inside
    still shows the host, which fits the model's off-GPU part; the cgroup does
    not, so `plan` says so and `up` refuses, writing nothing."""
    import os

    from builder.supervisor.gguf import read_header_file
    from tests.fixtures.deepseek_headers import write_variant

    assert tiny_stack.builder("base").returncode == 0
    base = tiny_stack.builder("base").stdout.split()[0]
    work = tmp_path / "work"
    first = write_variant(work / "models", "DeepSeek-R1-UD-IQ1_S")
    for shard in first.parent.glob("*.gguf"):  # whole length, sparse: the headers hold the only bytes
        os.truncate(shard, read_header_file(str(shard)).expected_size)
    (work / "builder.yaml").write_text(
        f"version: 1\nmodel:\n  name: r1\n  shards: {first.parent.name}/{first.name}\n  parameters:\n    num_gpu: 56\n    num_ctx: 2048\n"
        "storage:\n  local: models\ngpus: 2\nplan:\n  gpu_memory_gib: [140, 140]\ntarget: host\nhost:\n  prefix: ./prefix\n")
    # On this machine, without the container's limit, the same plan fits: the cgroup is what refuses.
    here = json.loads(subprocess.run([sys.executable, "-m", "builder", "plan", "--json"], cwd=work, capture_output=True, text=True, check=True).stdout)["ram"]
    assert here["fits"] is True and 2 << 30 < here["needed_bytes"] < here["available_bytes"]
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "ollama-linux-amd64.tgz").write_bytes(ollama_release_tgz())
    (carried / "llama-b4610-bin-ubuntu-x64.zip").write_bytes(llama_cpp_release_zip().read_bytes())
    pkgs = tmp_path / "pkgs"
    install = docker(
        "run", "--rm", "--network", "none", "-v", f"{wheelhouse}:/wheels:ro", "-v", f"{pkgs}:/opt/builder-pkgs", base,
        "sh", "-c", "python3 \"$(ls /wheels/pip-*.whl)/pip\" install -q --no-index --find-links /wheels --target /opt/builder-pkgs gguf-builder",
        check=False, timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    result = docker(
        "run", "--rm", "--network", "none", "--memory", "2g", "-v", f"{pkgs}:/opt/builder-pkgs:ro",
        "-v", f"{carried}:/carried:ro", "-v", f"{work}:/work", base, "sh", "-c", MEMORY_LIMITED,
        check=False, timeout=600,
    )
    out = result.stdout + result.stderr
    ram = next(line for line in out.splitlines() if line.startswith("ram "))
    assert "does NOT fit" in ram and "(cgroup v" in ram and "limit 2.0 GiB" in ram, out
    assert "EXIT 2" in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.parameters.num_gpu: the part of r1 that stays off the GPUs needs" in errors[0], out
    assert "(cgroup v" in errors[0]
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before  # no lock, prefix, home, merged file
