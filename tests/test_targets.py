"""The deploy targets: one interface, a registry by name, a tree whose
imports only point down (config <- render <- image <- targets <- cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from builder.errors import ConfigError
from builder.targets import TARGETS, get_target
from builder.targets.base import Declined, Target
from tests.helpers import run_builder

PACKAGE = Path(__file__).resolve().parent.parent / "builder"
OPERATIONS = ("render", "up", "down", "status", "logs")


@pytest.mark.parametrize("name", TARGETS)
def test_every_target_implements_the_interface(name: str) -> None:
    target = get_target(name)
    assert isinstance(target, Target) and target.name == name
    for operation in OPERATIONS:
        assert callable(getattr(target, operation))
    if target.deploys:
        # one interface for all: every target that deploys does every step itself or through ContainerTarget
        for operation in ("check", "prepare", "up", "probe", "down", "status", "logs"):
            assert getattr(type(target), operation) is not getattr(Target, operation, None), f"{name} must do {operation}"


def test_deploy_never_asks_which_target_it_drives() -> None:
    """`deploy` reads as one straight line: no needs_engine branch, no target-specific method."""
    import inspect

    from builder.targets import deploy

    source = inspect.getsource(deploy)
    assert "needs_engine" not in source and "up_host" not in source and "isinstance" not in source
    for step in ("assess(", "target.check(", "target.prepare(", "target.up(", "target.probe("):
        assert step in source


def test_kubernetes_declines_what_kubectl_does_with_the_command_to_use() -> None:
    target = get_target("kubernetes")
    with pytest.raises(Declined, match=r"use kubectl: kubectl apply -f context/kubernetes/"):
        target.up(None, Path("."), None, print)
    with pytest.raises(Declined, match=r"kubectl delete -f context/kubernetes/"):
        target.down("p", None, False)
    with pytest.raises(Declined, match=r"kubectl logs deploy/p -c serve"):
        target.logs("p", None, None, False, "all")


def test_an_unknown_target_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^target: 'swarm' is not a deploy target; choose one of compose, single, kubernetes, host$"):
        get_target("swarm")
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    config = tmp_path / "builder.yaml"
    config.write_text(config.read_text() + "target: swarm\n")
    result = run_builder("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "target: " in result.stderr and "swarm" in result.stderr


def test_the_config_remembers_the_target(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    config = tmp_path / "builder.yaml"
    config.write_text(config.read_text() + "target: single\n")
    assert run_builder("render", cwd=tmp_path).returncode == 0
    assert (tmp_path / "context" / "single" / "run.sh").is_file()
    assert run_builder("render", "--target", "kubernetes", "--out", str(tmp_path / "k8s"), cwd=tmp_path).returncode == 0
    assert (tmp_path / "k8s" / "kubernetes" / "deployment.yaml").is_file() and not (tmp_path / "k8s" / "single").exists()
    # The same image whatever the target: the target is not part of the config digest.
    compose = tmp_path / "compose.yaml"
    compose.write_text(config.read_text().replace("target: single\n", ""))
    single = (tmp_path / "context" / "Dockerfile").read_bytes()
    assert run_builder("render", "-c", str(compose), "--out", str(tmp_path / "c2"), cwd=tmp_path).returncode == 0
    assert (tmp_path / "c2" / "Dockerfile").read_bytes() == single


LAYERS = {  # package -> the builder packages and modules it may import
    "config": {"config", "errors", "modelfile", "supervisor"},
    "render": {"render", "config", "errors", "modelfile", "supervisor", "fsutil"},
    # the preflight reads the model and the machine; it never fetches, builds or deploys
    "preflight": {"preflight", "render", "config", "errors", "supervisor"},
    "image": {"image", "preflight", "render", "config", "errors", "fsutil", "progress", "supervisor"},
    "targets": {"targets", "image", "preflight", "render", "config", "errors", "fsutil", "progress", "supervisor"},
    "supervisor": {"supervisor"},
}


def _builder_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("builder."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "builder":
            found.update("__init__" for _ in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("builder."))
    return found - {"__init__"}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_only_point_down(package: str) -> None:
    for path in sorted((PACKAGE / package).glob("*.py")):
        wrong = _builder_imports(path) - LAYERS[package]
        assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}, above its layer"


def test_no_module_is_much_over_400_lines() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > 460}, sizes


def test_a_comma_in_the_model_folder_stays_one_mount_source(tmp_path: Path) -> None:
    """`storage.local: "./m,source=/etc"` once rendered as a second source=;
    Docker reads `--mount` as CSV (Go's encoding/csv), as Python's csv does."""
    import csv

    from builder.config import load_config
    from builder.render.blueprint import make_blueprint
    from builder.targets.single import single_argv

    config = tmp_path / "builder.yaml"
    config.write_text('version: 1\nmodel:\n  name: m\n  shards: s/s-00001-of-00002.gguf\nstorage:\n  local: "./m,source=/etc"\ngpus: none\n')
    argv = single_argv(make_blueprint(load_config(str(config))))
    value = argv[argv.index("--mount") + 1]
    fields = next(csv.reader([value]))
    assert fields == ["type=bind", f"source={tmp_path}/m,source=/etc", "target=/models"], value
    nfs = tmp_path / "nfs.yaml"
    nfs.write_text('version: 1\nmodel:\n  name: m\n  shards: s/s-00001-of-00002.gguf\nstorage:\n  nfs:\n    server: 127.0.0.1\n'
                   '    export: /x\n    options: "rw,nfsvers=4.1"\ngpus: none\n')
    argv = single_argv(make_blueprint(load_config(str(nfs))))
    fields = next(csv.reader([argv[argv.index("--mount") + 1]]))
    assert "volume-opt=o=addr=127.0.0.1,rw,nfsvers=4.1" in fields and len(fields) == 7


@pytest.mark.parametrize("extra, merge, create", [
    ("", "1Gi", "1Gi"),
    ("  merge_tool: llama-gguf-split\n", "4Gi", "1Gi"),
])
def test_kubernetes_init_containers_are_sized_by_their_work(tmp_path: Path, extra: str, merge: str, create: str) -> None:
    from builder.config import load_config
    from builder.render.blueprint import make_blueprint
    from builder.targets.kubernetes import kubernetes_manifests

    config = tmp_path / "builder.yaml"
    config.write_text(f"version: 1\nmodel:\n  name: m\n  shards: s/s-00001-of-00002.gguf\n{extra}storage:\n  local: m\ngpus: none\n")
    files, _ = kubernetes_manifests(make_blueprint(load_config(str(config))))
    deployment = files["kubernetes/deployment.yaml"][0]
    steps = {c["name"]: c["resources"]["limits"]["memory"] for c in deployment["spec"]["template"]["spec"]["initContainers"]}
    assert steps == {"merge": merge, "create": create}
