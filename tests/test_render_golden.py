"""Every preset's rendered context, compared byte for byte with tests/golden.

After an intended change: `make golden` (pytest --update-golden), then read
the diff before committing it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builder.cli import PRESETS_DIR, preset_names
from builder.config import parse_config
from builder.render.blueprint import make_blueprint
from builder.targets import context_files

GOLDEN = Path(__file__).parent / "golden"
# Local storage paths resolve against the config's folder; fix it so the
# golden files do not depend on where the tests run.
CONFIG_DIR = Path("/srv/builder")


def render_preset(name: str, env: dict[str, str] | None = None, targets=("compose",)) -> dict[str, bytes]:
    text = (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    config = parse_config(text, "builder.yaml", base_dir=CONFIG_DIR, env=env or {})
    files: dict[str, bytes] = {}
    for target in targets:
        files.update(context_files(make_blueprint(config), target))
    return files


@pytest.mark.parametrize("preset", preset_names())
def test_golden(preset: str, update_golden: bool) -> None:
    rendered = render_preset(preset, targets=("compose", "single", "kubernetes"))
    files = {k: v for k, v in rendered.items() if "/supervisor/" not in k}
    folder = GOLDEN / preset
    if update_golden:
        shutil.rmtree(folder, ignore_errors=True)
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        pytest.fail(f"rewrote tests/golden/{preset}: read the diff, then run the tests without --update-golden", pytrace=False)
    expected = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert sorted(files) == sorted(expected)
    for name, data in files.items():
        assert data == expected[name], f"{preset}/{name} differs from tests/golden; run `make golden` if intended"


def test_supervisor_is_staged_verbatim() -> None:
    # Against the sources on disk, not the function the renderer itself calls.
    files = render_preset("tiny")
    staged = {k.rsplit("/", 1)[1]: v for k, v in files.items() if "/supervisor/" in k}
    sources = Path(__file__).resolve().parent.parent / "builder" / "supervisor"
    on_disk = {p.name: p.read_bytes() for p in sorted(sources.glob("*.py"))}
    assert staged == on_disk
    assert all(k.startswith("rootfs/opt/builder/supervisor/") for k in files if "/supervisor/" in k)
    assert {"__main__.py", "shards.py", "loadable.py"} <= set(staged)


RENDER_SCRIPT = """
import hashlib, json, sys
from pathlib import Path
from builder.config import parse_config
from builder.render.blueprint import make_blueprint
from builder.targets import context_files
from builder.cli import PRESETS_DIR
name = sys.argv[1]
config = parse_config((PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8"), "builder.yaml", base_dir=Path("/srv/builder"), env={})
files = {}
for target in ("compose", "single", "kubernetes"):
    files.update(context_files(make_blueprint(config), target))
print(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}))
"""


@pytest.mark.parametrize("preset", ["tiny", "deepseek-r1-ud-iq1_m"])
def test_render_is_byte_stable_across_processes(preset: str, tmp_path: Path) -> None:
    """Two processes with another hash seed, time zone, umask and folder render the same bytes."""
    import hashlib
    import json
    import os
    import subprocess
    import sys

    outputs = []
    for seed, zone, mask in (("1", "UTC", "022"), ("4242", "Asia/Shanghai", "077")):
        folder = tmp_path / f"cwd-{seed}"
        folder.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "TZ": zone}
        result = subprocess.run(["sh", "-c", f'umask {mask} && exec "$0" -c "$1" "$2"', sys.executable, RENDER_SCRIPT, preset],
                                cwd=folder, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1]
    here = render_preset(preset, targets=("compose", "single", "kubernetes"))
    assert outputs[0] == {k: hashlib.sha256(v).hexdigest() for k, v in here.items()}


def test_env_overrides_mirrors_and_tag() -> None:
    env = {
        "BUILDER_IMAGE_TAG": "v9",
        "BUILDER_MIRROR_REGISTRY": "registry.example.cn",
        "BUILDER_MIRROR_DEBIAN": "http://mirrors.example.cn/debian",
    }
    files = render_preset("tiny", env)
    compose = files["compose.yaml"].decode()
    assert 'image: "builder-tiny:v9"' in compose
    dockerfile = files["Dockerfile"].decode()
    plain = render_preset("tiny")["Dockerfile"].decode()
    # The Debian mirror is an input of the bootstrap base, so its name changes.
    base = next(line for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert base != next(line for line in plain.splitlines() if line.startswith("FROM "))
    config = parse_config((PRESETS_DIR / "tiny.yaml").read_text(encoding="utf-8"), "builder.yaml", base_dir=CONFIG_DIR, env=env)
    assert config.registry_mirror == "registry.example.cn"
    # A bootstrapped base needs no registry: the registry mirror alone changes nothing rendered.
    assert render_preset("tiny", {"BUILDER_MIRROR_REGISTRY": "registry.example.cn"}) == render_preset("tiny")


def test_deepseek_preset_has_nfs_gpus_and_order() -> None:
    import yaml

    compose = yaml.safe_load(render_preset("deepseek-r1-ud-iq1_m")["compose.yaml"])
    opts = compose["volumes"]["models"]["driver_opts"]
    assert opts == {"type": "nfs", "o": "addr=192.0.2.10,rw,nfsvers=4.1,hard", "device": ":/export/models"}
    services = compose["services"]
    assert services["create"]["depends_on"] == {"merge": {"condition": "service_completed_successfully"}}
    assert services["serve"]["depends_on"] == {"create": {"condition": "service_completed_successfully"}}
    devices = services["serve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 2, "capabilities": ["gpu"]}]  # the seed's 2 x 24 GB
    assert services["serve"]["ports"][0]["host_ip"] == "127.0.0.1"
    modelfile = render_preset("deepseek-r1-ud-iq1_m")["rootfs/etc/builder/Modelfile"].decode()
    assert "FROM /models/DeepSeek-R1-UD-IQ1_M/DeepSeek-R1-UD-IQ1_M.gguf\n" in modelfile
    assert 'TEMPLATE """<｜User｜>{{ .Prompt }}<｜Assistant｜>"""' in modelfile
    assert "PARAMETER num_gpu 14\n" in modelfile


@pytest.mark.parametrize("preset", preset_names())
def test_kubernetes_manifests_pass_kubernetes_validate(preset: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    files = render_preset(preset, targets=("kubernetes",))
    manifests = []
    for name, data in files.items():
        if name.startswith("kubernetes/") and name.endswith(".yaml"):
            (tmp_path / Path(name).name).write_bytes(data)
            manifests.append(str(tmp_path / Path(name).name))
    assert len(manifests) >= 2
    script = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run([str(script), "--strict", "-k", "1.30", *manifests], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == sum(data.count(b"\nkind: ") + data.startswith(b"kind:") for name, data in files.items() if name.endswith(".yaml"))


def test_kubernetes_shapes() -> None:
    import yaml

    files = render_preset("deepseek-r1-ud-q2_k_xl", targets=("kubernetes",))
    deployment = yaml.safe_load(files["kubernetes/deployment.yaml"])
    pod = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["merge", "create"]
    assert [c["args"] for c in pod["initContainers"]] == [["merge"], ["create"]]
    serve = pod["containers"][0]
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == 2  # what num_gpu was planned for
    # Ready only once the model answers; started and alive while ollama
    # answers: no probe puts a deadline on a load that progresses (ollama's
    # load timeout is a stall timer), so a slow load never restarts the pod.
    assert serve["readinessProbe"]["exec"]["command"] == ["python3", "-m", "supervisor", "health", "--loaded"]
    assert serve["startupProbe"]["exec"]["command"] == ["python3", "-m", "supervisor", "health"]
    assert "--loaded" not in serve["livenessProbe"]["exec"]["command"]
    assert serve["livenessProbe"]["exec"]["command"] == ["python3", "-m", "supervisor", "health"]
    pv, pvc = yaml.safe_load_all(files["kubernetes/storage.yaml"])
    assert pv["spec"]["nfs"] == {"server": "192.0.2.10", "path": "/export/models"}
    assert pv["spec"]["mountOptions"] == ["rw", "nfsvers=4.1", "hard"]
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert "num_gpu was planned for 2 GPU(s) of 24 + 24 GiB" in files["kubernetes/NOTES.md"].decode()
    tiny = yaml.safe_load(render_preset("tiny", targets=("kubernetes",))["kubernetes/deployment.yaml"])
    assert "nvidia.com/gpu" not in tiny["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert tiny["spec"]["template"]["spec"]["volumes"][0]["hostPath"] == {"path": "/srv/builder/models", "type": "Directory"}


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_asks_kubernetes_for_the_gpus_it_was_planned_for(preset: str) -> None:
    import yaml

    text = (PRESETS_DIR / f"{preset}.yaml").read_text(encoding="utf-8")
    config = parse_config(text, "builder.yaml", base_dir=CONFIG_DIR, env={})
    files = render_preset(preset, targets=("kubernetes",))
    serve = yaml.safe_load(files["kubernetes/deployment.yaml"])["spec"]["template"]["spec"]["containers"][0]
    asked = serve.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
    planned = len(config.plan.gpu_memory_gib) if config.plan.gpu_memory_gib else (config.gpus.count or 0)
    assert asked == planned


def test_gpus_all_without_known_gpu_memory_is_refused_for_kubernetes() -> None:
    from builder.errors import ConfigError

    text = (PRESETS_DIR / "deepseek-r1-ud-iq1_m.yaml").read_text(encoding="utf-8")
    text = text.replace("gpus: 2\nplan:\n  gpu_memory_gib: [24, 24]", "gpus: all")
    assert "gpus: all" in text
    config = parse_config(text, "builder.yaml", base_dir=CONFIG_DIR, env={})
    with pytest.raises(ConfigError, match=r"gpus: all has no Kubernetes equivalent: a pod asks for a number of GPUs; set gpus: N"):
        context_files(make_blueprint(config), "kubernetes")
    context_files(make_blueprint(config), "compose")  # Compose can say all


def test_gpu_product_selects_the_nodes_and_counts_must_agree() -> None:
    import yaml

    from builder.errors import ConfigError

    text = (PRESETS_DIR / "deepseek-r1-ud-iq1_m.yaml").read_text(encoding="utf-8")
    config = parse_config(text + "kubernetes:\n  gpu_product: NVIDIA-GeForce-RTX-4090\n", "builder.yaml", base_dir=CONFIG_DIR, env={})
    pod = yaml.safe_load(context_files(make_blueprint(config), "kubernetes")["kubernetes/deployment.yaml"])["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}
    with pytest.raises(ConfigError, match=r"plan.gpu_memory_gib: lists 2 GPU\(s\) but gpus asks for 3"):
        parse_config(text.replace("gpus: 2", "gpus: 3"), "builder.yaml", base_dir=CONFIG_DIR, env={})
