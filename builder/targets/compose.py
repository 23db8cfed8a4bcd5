"""`builder up/down/status/logs`: the rendered stack on Compose v2.

`up` runs the steps one at a time so each exit code is read and each log is
seen: merge, then create (both one-shot), then serve, detached, waited on
until healthy; then the endpoint itself is asked for the model.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from builder.image.engine import compose_argv
from builder.errors import BuilderError, ConfigError, Problem
from builder.render.blueprint import Blueprint

ONE_SHOT = ("merge", "create")
LOG_TAIL = 15


@dataclass(frozen=True)
class Endpoint:
    url: str
    model: str


def endpoint_url(blueprint: Blueprint) -> str:
    serve = blueprint.config.serve
    host = "127.0.0.1" if serve.bind in ("0.0.0.0", "::") else serve.bind
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{serve.port}"




def check_storage(blueprint: Blueprint) -> None:
    """Local storage must exist and be writable by the containers' user
    (merge writes the merged file, create ollama's store)."""
    config = blueprint.config
    storage = config.storage
    if storage.kind != "local":
        return
    root = Path(storage.path)
    if not root.is_dir():
        raise ConfigError(
            Problem("storage.local", f"the folder {root} does not exist; create it and put the shards there", None, config.source)
        )
    for folder in (root, root / config.model.shards.folder):
        if folder.is_dir() and not writable_by(folder, config.uid, config.gid):
            raise ConfigError(
                Problem(
                    "storage.local",
                    f"{folder} is not writable by the containers' user {config.uid}:{config.gid}; "
                    f"chown -R {config.uid}:{config.gid} {root} (or set image.uid and image.gid)",
                    None,
                    config.source,
                )
            )


def writable_by(path: Path, uid: int, gid: int) -> bool:
    info = path.stat()
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & 0o200)
    if info.st_gid == gid:
        return bool(info.st_mode & 0o020)
    return bool(info.st_mode & 0o002)


def run_step(context: Path, service: str, echo: Callable[[str], None]) -> None:
    """Run one one-shot service attached, streaming its log; fail with its tail."""
    argv = compose_argv(context / "compose.yaml", "up", "--no-deps", "--no-log-prefix", "--exit-code-from", service, service)
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    tail: deque[str] = deque(maxlen=LOG_TAIL)
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip("\n")
        if not line.strip() or _compose_chatter(line):
            continue
        tail.append(line)
        echo(f"  {service} | {line}")
    code = process.wait()
    if code != 0:
        reason = next((l.split("error: ", 1)[1] for l in reversed(tail) if "supervisor: error: " in l), None)
        raise BuilderError(
            f"{service} failed (exit {code}): {reason or (tail[-1] if tail else 'no output')}; serve was not started "
            f"(full log: builder logs {service})"
        )


def _compose_chatter(line: str) -> bool:
    text = line.strip()
    return text.startswith(("Attaching to", "Container ", "Aborting on container exit")) or " exited with code " in text or text.startswith(("Network ", "Volume "))


def up(blueprint: Blueprint, context: Path, engine, echo: Callable[[str], None]) -> Endpoint:
    """Bring the stack up and wait until the endpoint lists the model."""
    check_storage(blueprint)
    _replace_stale_volume(blueprint, context, engine, echo)
    for service in ONE_SHOT:
        echo(f"{service}: running")
        run_step(context, service, echo)
    echo("serve: starting")
    timeout = blueprint.config.serve.ready_timeout
    deadline = time.monotonic() + timeout
    result = engine.compose(context / "compose.yaml", "up", "-d", "--no-deps", "--wait", "--wait-timeout", str(timeout), "serve")
    if result.returncode != 0:
        detail = " ".join(result.stderr.strip().splitlines()[-2:])
        hint = ""
        if "could not select device driver" in detail:
            hint = "; the NVIDIA container toolkit is missing on this host (or set gpus: none)"
        raise BuilderError(f"serve did not start: {detail}{hint}")
    url = endpoint_url(blueprint)
    wait_for_model(url, blueprint.config.model.name, max(5.0, deadline - time.monotonic()))
    return Endpoint(url, blueprint.config.model.name)


@dataclass(frozen=True)
class Load:
    seconds: float
    size: int
    size_vram: int


def wait_for_load(blueprint: Blueprint, engine, container: str, echo: Callable[[str], None], tty: bool) -> Load:
    """Wait until the supervisor in `container` reports the model loaded
    (`health --loaded --json`), with progress; raise with the cause if the
    load failed or the container stopped. The deadline is ollama's own load
    timeout (the supervisor reports it) plus two minutes: by then ollama has
    given up itself."""
    import sys

    model = blueprint.config.model.name
    started = time.monotonic()
    deadline = started + blueprint.config.serve.ready_timeout
    shown = -1
    while True:
        code, output = engine.exec_in(container, ["python3", "-m", "supervisor", "health", "--loaded", "--json"])
        try:
            state = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
        except ValueError:
            state = {}
        if code == 0 and state.get("state") == "loaded":
            if tty and shown >= 0:
                sys.stderr.write("\n")
            return Load(float(state.get("load_seconds", 0.0)), int(state.get("size", 0)), int(state.get("size_vram", 0)))
        if state.get("state") == "failed":
            if tty and shown >= 0:
                sys.stderr.write("\n")
            raise LoadFailed(state.get("error") or "unknown cause")
        info = engine.container(container)
        if info is None or info["status"] in ("exited", "dead"):
            raise LoadFailed(f"the serve container stopped (exit {info and info.get('exit_code')}) before the model loaded")
        if state.get("load_timeout_s"):
            deadline = started + float(state["load_timeout_s"]) + 120
        elapsed = int(time.monotonic() - started)
        if tty:
            sys.stderr.write(f"\rload: {model} loading, {elapsed} s")
            sys.stderr.flush()
            shown = elapsed
        elif elapsed // 30 > shown:
            shown = elapsed // 30
            echo(f"load: {model} loading, {elapsed} s")
        if time.monotonic() > deadline:
            raise LoadFailed(f"not loaded after {elapsed} s (ollama's load timeout plus 2 minutes)")
        time.sleep(0.5)


class LoadFailed(BuilderError):
    """The model did not load: exit 1, the stack left up for `builder logs`."""


def describe_load(blueprint: Blueprint, load: Load) -> str:
    from builder.supervisor.common import human_bytes

    planned = dict(blueprint.config.model.parameters).get("num_gpu")
    share = f"{load.size_vram * 100 // load.size}%" if load.size else "0%"
    plan_note = f"; planned num_gpu {planned}" if planned is not None else ""
    if blueprint.config.gpus.kind == "none":
        plan_note = "; planned: no GPU (gpus: none)"
    return (f"{blueprint.config.model.name} loaded in {load.seconds:.1f} s: {human_bytes(load.size)}, "
            f"{human_bytes(load.size_vram)} ({share}) in GPU memory{plan_note}")


def wait_for_model(url: str, model: str, timeout: float) -> None:
    """Ask the endpoint until it answers and lists the model (httpx + tenacity)."""
    from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

    class NotYet(Exception):
        pass

    def ask() -> None:
        names = listed_models(url)
        if names is None:
            raise NotYet("no answer")
        wanted = full_name(model)
        if wanted not in names:
            raise NotYet(f"{wanted} is not listed (found: {', '.join(sorted(n for n in names if n)) or 'none'})")

    try:
        for attempt in Retrying(
            stop=stop_after_delay(timeout), wait=wait_exponential(multiplier=0.2, max=5), retry=retry_if_exception_type(NotYet)
        ):
            with attempt:
                ask()
    except RetryError as exc:
        raise BuilderError(f"{url} did not list {model} within {timeout:.0f} s ({exc.last_attempt.exception()}); see `builder logs serve`") from None


def full_name(model: str) -> str:
    """ollama lists `NAME` as `NAME:latest`."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def listed_models(url: str) -> set[str] | None:
    """The names /api/tags lists, or None when the endpoint does not answer
    properly. Never through a proxy: the endpoint is on this machine."""
    import httpx

    try:
        response = httpx.get(f"{url}/api/tags", timeout=10, trust_env=False)
        if response.status_code != 200:
            return None
        return {m.get("name") for m in response.json().get("models", []) if isinstance(m, dict)}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def loaded_model(url: str, model: str) -> dict | None:
    """The model's /api/ps entry (size, size_vram, expires_at) while it is loaded."""
    import httpx

    wanted = full_name(model)
    try:
        response = httpx.get(f"{url}/api/ps", timeout=10, trust_env=False)
        if response.status_code != 200:
            return None
        for entry in response.json().get("models", []):
            if isinstance(entry, dict) and wanted in (entry.get("name"), entry.get("model")):
                return {k: entry.get(k) for k in ("size", "size_vram", "expires_at")}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return None


def _replace_stale_volume(blueprint: Blueprint, context: Path, engine, echo) -> None:
    """A volume whose mount options no longer match the config is removed and
    made again (removing a bind or NFS volume definition leaves the data)."""
    name = f"{blueprint.config.project}_models"
    options = engine.volume_options(name)
    wanted = blueprint.compose["driver_opts"]
    if options is not None and options != wanted:
        echo(f"volume {name} points elsewhere ({options.get('device')}); recreating it for {wanted.get('device')}")
        result = engine.compose(context / "compose.yaml", "down")
        if result.returncode != 0:
            raise BuilderError(f"cannot stop the stack to recreate volume {name}: {result.stderr.strip()}")
        engine.remove_volume(name)


def status(blueprint: Blueprint, engine, lock_sha256: str | None) -> dict:
    """A query, reading only: the stack's containers (found by project, so
    no context is rendered), the image's labels, the endpoint."""
    from builder.image.build import image_staleness

    project = blueprint.config.project
    result = engine.compose_project(project, "ps", "-a", "--format", "json")
    if result.returncode != 0:
        raise BuilderError(f"docker compose ps failed: {result.stderr.strip()}")
    services = {}
    for line in result.stdout.splitlines():
        if not line.strip():
            continue
        entries = json.loads(line)
        for entry in entries if isinstance(entries, list) else [entries]:
            services[entry["Service"]] = {
                "state": entry.get("State"),
                "health": entry.get("Health") or None,
                "exit_code": entry.get("ExitCode"),
                "status": entry.get("Status"),
            }
    single = engine.container(project)
    if single is not None and single["labels"].get("io.builder.role") == "all":
        target = "single"
        services = {"all": {"state": single["status"], "health": single["health"], "exit_code": single["exit_code"], "status": single["status"]}}
    else:
        target = "compose"
        services = {name: services.get(name, {"state": "absent"}) for name in ("merge", "create", "serve")}
    url = endpoint_url(blueprint)
    names = listed_models(url)
    model_listed = None if names is None else full_name(blueprint.config.model.name) in names
    return {
        "project": project,
        "target": target,
        "image": blueprint.image,
        "image_id": engine.image_id(blueprint.image),
        "image_stale": image_staleness(blueprint, engine.image_labels(blueprint.image), lock_sha256) or None,
        "endpoint": url,
        "model": blueprint.config.model.name,
        "model_listed": model_listed,
        "loaded": loaded_model(url, blueprint.config.model.name) if model_listed else None,
        "services": services,
    }


def up_single(blueprint: Blueprint, context: Path, engine, echo: Callable[[str], None]) -> Endpoint:
    """The whole pipeline in one container (the supervisor's `all` role)."""
    from builder.image.engine import run_command
    from builder.targets.single import single_argv

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
    wait_for_model(url, blueprint.config.model.name, max(5.0, deadline - time.monotonic()))
    return Endpoint(url, blueprint.config.model.name)
