"""The `single` target: one container runs merge, create and serve (the
supervisor's `all` role), for platforms that run one image, and the AutoDL
script that does the same inside an instance. Rendering is pure: argv and
file contents as values."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath
from typing import Callable

from builder.errors import BuilderError
from builder.render.blueprint import (
    KEYS_FILE_NAME, KEYS_IN_CONTAINER, MODELS_DIR, OLLAMA_INTERNAL_PORT, OLLAMA_PORT, OLLAMA_PREFIX, Blueprint, gate_env,
)
from builder.targets.base import ContainerTarget
from builder.targets.keys import endpoint_headers
from builder.targets.common import Endpoint, check_storage, endpoint_url, wait_for_model


AUTODL_DATA_DISK = "/root/autodl-tmp"

AUTODL_PORT = 6006

def _csv(fields: list[str]) -> str:
    """`--mount`'s value: Docker reads it with Go's encoding/csv, so a field
    holding a comma or a quote is quoted, quotes doubled (csv's own rules),
    and `storage.local: "./m,source=/etc"` stays one source."""
    import csv
    import io

    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()

def single_mount(blueprint: Blueprint) -> str:
    opts = blueprint.compose["driver_opts"]
    readonly = ["readonly"] if blueprint.compose["model_cache"] else []  # the cache takes every write
    if opts["type"] == "none":
        return _csv(["type=bind", f"source={opts['device']}", f"target={MODELS_DIR}", *readonly])
    return _csv([
        "type=volume",
        f"source={blueprint.config.project}_models",
        f"target={MODELS_DIR}",
        "volume-driver=local",
        f"volume-opt=type={opts['type']}",
        f"volume-opt=o={opts['o']}",
        f"volume-opt=device={opts['device']}",
        *readonly,
    ])

def single_gpus(blueprint: Blueprint) -> list[str]:
    gpus = blueprint.config.gpus
    if gpus.kind == "none":
        return []
    if gpus.kind == "all":
        return ["--gpus", "all"]
    if gpus.kind == "count":
        return ["--gpus", str(gpus.count)]
    return ["--gpus", f'"device={",".join(gpus.ids)}"']

def single_argv(blueprint: Blueprint) -> list[str]:
    """The `docker run` that runs merge, create and serve in one container."""
    config = blueprint.config
    argv = ["docker", "run", "-d", "--name", config.project, "--restart", "unless-stopped"]
    for key, value in sorted(blueprint.compose["labels"].items()):
        argv += ["--label", f"{key}={value}"]
    argv += ["--label", "io.builder.role=all"]
    # Least privilege, as the Compose services have it.
    argv += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", "--read-only",
             "--tmpfs", "/tmp:size=256m,mode=1777", "--pids-limit", "512"]
    if blueprint.compose["mem_limit"]:  # the plan's RAM need + 2 GiB (serve.memory_limit)
        argv += ["--memory", blueprint.compose["mem_limit"]]
    argv += ["--publish", f"{config.serve.bind}:{config.serve.port}:{OLLAMA_PORT}" if ":" not in config.serve.bind
             else f"[{config.serve.bind}]:{config.serve.port}:{OLLAMA_PORT}"]
    argv += ["--mount", single_mount(blueprint)]
    if blueprint.compose["model_cache"]:  # storage.model_cache: the merged file and ollama's store
        argv += ["--mount", _csv(["type=bind", f"source={blueprint.compose['model_cache']}", f"target={blueprint.compose['model_cache_dir']}"])]
    if blueprint.compose["keys_file"]:  # serve.auth: keys: the gate's keys, read-only
        argv += ["--mount", _csv(["type=bind", f"source={blueprint.compose['keys_file']}", f"target={KEYS_IN_CONTAINER}", "readonly"])]
    argv += ["--health-cmd", "python3 -m supervisor health", "--health-interval", "10s",
             "--health-timeout", "5s", "--health-retries", "3", "--health-start-period", "30s"]
    argv += single_gpus(blueprint)
    for name, value in {**blueprint.compose["create_env"], **blueprint.compose["serve_env"]}.items():
        argv += ["--env", f"{name}={value}"]
    argv += [blueprint.image, "all"]
    return argv

def without_cache(env: dict[str, str]) -> dict[str, str]:
    """autodl.sh keeps everything on the instance's data disk, a local disk: no model cache."""
    return {k: v for k, v in env.items() if k != "BUILDER_MODEL_CACHE"}

def render_single(blueprint: Blueprint, env) -> dict[str, bytes]:
    from builder import __version__
    from builder.render.blueprint import LLAMA_CPP_BIN, OLLAMA_STORE, SUPERVISOR_HOME

    run = env.get_template("targets/single/run.sh.j2").render(
        builder_version=__version__, name=blueprint.config.project, argv=single_argv(blueprint)
    )
    shards_folder = str(PurePosixPath(blueprint.config.model.shards.folder)) if blueprint.config.model.shards.folder else "."
    config = blueprint.config
    bind = config.serve.bind if ":" not in config.serve.bind else f"[{config.serve.bind}]"
    serve_env = dict(blueprint.compose["serve_env"])
    serve_env.pop("BUILDER_GATE", None)  # the instance's own: its port, its data disk
    serve_env.update(gate_env(config, f"{bind}:{AUTODL_PORT}", OLLAMA_INTERNAL_PORT, f"{AUTODL_DATA_DISK}/{KEYS_FILE_NAME}"))
    autodl_env = [
        ("OLLAMA_HOST", f"{bind}:{AUTODL_PORT}"),
        ("OLLAMA_MODELS", OLLAMA_STORE),
        ("LD_LIBRARY_PATH", LLAMA_CPP_BIN),
        ("PYTHONPATH", SUPERVISOR_HOME),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        *without_cache(blueprint.compose["create_env"]).items(),
        *sorted(without_cache(serve_env).items()),
    ]
    autodl = env.get_template("targets/single/autodl.sh.j2").render(
        builder_version=__version__,
        data_disk=AUTODL_DATA_DISK,
        shards_folder=shards_folder,
        port=AUTODL_PORT,
        ollama_prefix=OLLAMA_PREFIX,
        models_dir=MODELS_DIR,
        env=autodl_env,
        log=f"{AUTODL_DATA_DISK}/builder-serve.log",
        keys=f"{AUTODL_DATA_DISK}/{KEYS_FILE_NAME}" if config.serve.auth == "keys" else None,
        bind=bind,
    )
    return {"single/run.sh": run.encode(), "single/autodl.sh": autodl.encode()}

def up_single(blueprint: Blueprint, context: Path, engine, echo: Callable[[str], None]) -> Endpoint:
    """The whole pipeline in one container (the supervisor's `all` role)."""
    from builder.image.engine import run_command

    check_storage(blueprint)
    name = blueprint.config.project
    current = engine.container(name)
    wanted = blueprint.compose["labels"]["io.builder.config.sha256"]
    if current and current["labels"].get("io.builder.role") != "all":
        raise BuilderError(f"a container named {name} exists and builder did not make it; remove it or change project")
    if current and current["status"] == "running" and current["labels"].get("io.builder.config.sha256") == wanted:
        echo(f"{name}: already running with this config")
    else:
        if current:
            echo(f"{name}: replacing the container ({current['status']}, made from another config or stopped)")
            engine.remove_container(name)
        argv = single_argv(blueprint)
        echo("$ " + " ".join(argv))
        result = run_command(argv)
        if result.returncode != 0:
            detail = " ".join(result.stderr.strip().splitlines()[-2:])
            raise BuilderError(f"docker run failed: {detail}")
    _wait_for_the_serve_role(engine, name, echo)
    timeout = blueprint.config.serve.ready_timeout
    deadline = time.monotonic() + timeout
    while True:
        state = engine.container(name) or {"status": "gone"}
        if state["status"] in ("exited", "dead", "gone"):
            tail = engine.container_logs(name) if state["status"] != "gone" else ""
            reason = next((l.split("error: ", 1)[1] for l in reversed(tail.splitlines()) if "supervisor: error: " in l), None)
            raise BuilderError(f"{name} stopped (exit {state.get('exit_code')}): {reason or tail.strip()[-300:] or 'no output'}")
        if state["health"] == "healthy":
            break
        if time.monotonic() > deadline:
            raise BuilderError(f"{name} was not healthy within {timeout} s; see `docker logs {name}`")
        time.sleep(0.5)
    url = endpoint_url(blueprint)
    wait_for_model(url, blueprint.config.model.name, max(5.0, deadline - time.monotonic()), endpoint_headers(blueprint, "single"))
    return Endpoint(url, blueprint.config.model.name)


def _wait_for_the_serve_role(engine, name: str, echo: Callable[[str], None]) -> None:
    """merge and create first, however long they take (a 150 GB model: an hour
    with ollama 0.30+'s rewrite); the supervisor ends or fails them itself.
    serve.ready_timeout counts from serve's start, as for the compose target."""
    started, said = time.monotonic(), 0.0
    while True:
        state = engine.container(name) or {"status": "gone"}
        if state["status"] != "running":
            return  # the caller's loop says why
        if "supervisor: serve: starting" in engine.container_logs(name, tail="all"):
            return
        if time.monotonic() - said >= 60:
            said = time.monotonic()
            if said - started >= 60:
                echo(f"{name}: merge and create still working after {said - started:.0f} s (docker logs -f {name})")
        time.sleep(1)


class SingleTarget(ContainerTarget):
    """Everything in one container: `docker run` (single/run.sh), or AutoDL."""

    name = "single"

    def render(self, blueprint: Blueprint, env) -> dict[str, bytes]:
        return render_single(blueprint, env)

    def up(self, blueprint: Blueprint, context: Path, engine, echo) -> Endpoint:
        return up_single(blueprint, context, engine, echo)

    def serve_container(self, blueprint: Blueprint, engine) -> str | None:
        return blueprint.config.project

    def logs_hint(self, blueprint: Blueprint) -> str:
        return "builder logs"

    def down(self, project: str, engine, volumes: bool, config=None) -> None:
        info = engine.container(project)
        if info is not None and info["labels"].get("io.builder.role") != "all":
            raise BuilderError(f"the container {project} was not made by builder; remove it yourself")
        engine.remove_container(project)
        if volumes:
            engine.remove_volume(f"{project}_models")

    def status(self, blueprint: Blueprint, engine, lock_sha256: str | None) -> dict:
        from builder.targets.common import container_probe
        from builder.targets.status import status_report

        info = engine.container(blueprint.config.project)
        state = {"state": "absent"} if info is None else {
            "state": info["status"], "health": info["health"], "exit_code": info["exit_code"], "status": info["status"],
        }
        probe = container_probe(engine, blueprint.config.project) if state["state"] == "running" else None
        return status_report(blueprint, engine, lock_sha256, "single", {"all": state}, probe)

    def logs(self, project: str, engine, service: str | None, follow: bool, tail: str, config=None) -> None:
        from builder.image.engine import run_command

        if service:
            raise BuilderError(f"the single target runs every step in one container: `builder logs` shows them all, not {service} alone")
        result = run_command(["docker", "logs", "--tail", tail, *(["-f"] if follow else []), project], stream=True)
        if result.returncode != 0:
            raise BuilderError(f"docker logs {project} failed (exit {result.returncode})")


TARGET = SingleTarget()
