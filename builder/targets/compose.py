"""The `compose` target: the rendered stack on Compose v2.

`up` runs the steps one at a time so each exit code is read and each log is
seen: merge, then create (both one-shot), then serve, detached, waited on
until healthy; then the endpoint itself is asked for the model.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Callable

from builder.errors import BuilderError
from builder.image.engine import compose_argv
from builder.render.blueprint import Blueprint
from builder.targets.base import ContainerTarget
from builder.targets.keys import endpoint_headers
from builder.targets.common import Endpoint, check_storage, container_probe, endpoint_url, relay_step, wait_for_model
from builder.targets.status import status_report


ONE_SHOT = ("merge", "create")


def run_step(context: Path, service: str, echo: Callable[[str], None]) -> None:
    """Run one one-shot service attached, streaming its log; fail with its tail."""
    argv = compose_argv(context / "compose.yaml", "up", "--no-deps", "--no-log-prefix", "--exit-code-from", service, service)
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None
    relay_step(service, (line for line in process.stdout if not _compose_chatter(line)), process.wait, echo,
               f"serve was not started (full log: builder logs {service})")


def _compose_chatter(line: str) -> bool:
    text = line.strip()
    return text.startswith(("Attaching to", "Container ", "Aborting on container exit")) or " exited with code " in text or text.startswith(("Network ", "Volume "))

def up(blueprint: Blueprint, context: Path, engine, echo: Callable[[str], None]) -> Endpoint:
    """Bring the stack up and wait until the endpoint lists the model."""
    check_storage(blueprint)
    _replace_stale_volume(blueprint, context, engine, echo)
    for service in ONE_SHOT:
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
    wait_for_model(url, blueprint.config.model.name, max(5.0, deadline - time.monotonic()), endpoint_headers(blueprint, "compose"))
    return Endpoint(url, blueprint.config.model.name)

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
    services = {name: services.get(name, {"state": "absent"}) for name in ("merge", "create", "serve")}
    serve = engine.service_container(project, "serve") if services["serve"].get("state") == "running" else None
    return status_report(blueprint, engine, lock_sha256, "compose", services, container_probe(engine, serve) if serve else None)


class ComposeTarget(ContainerTarget):
    """merge, create and serve as three Compose services on this host."""

    name = "compose"

    def up(self, blueprint: Blueprint, context: Path, engine, echo) -> Endpoint:
        return up(blueprint, context, engine, echo)

    def serve_container(self, blueprint: Blueprint, engine) -> str | None:
        return engine.service_container(blueprint.config.project, "serve")

    def logs_hint(self, blueprint: Blueprint) -> str:
        return "builder logs serve"

    def down(self, project: str, engine, volumes: bool, config=None) -> None:
        result = engine.compose_project(project, "down", "--remove-orphans", *(["--volumes"] if volumes else []))
        if result.returncode != 0:
            raise BuilderError(f"docker compose down failed: {result.stderr.strip()}")

    def status(self, blueprint: Blueprint, engine, lock_sha256: str | None) -> dict:
        return status(blueprint, engine, lock_sha256)

    def logs(self, project: str, engine, service: str | None, follow: bool, tail: str, config=None) -> None:
        args = ["logs", "--no-color", "--tail", tail] + (["-f"] if follow else []) + ([service] if service else [])
        result = engine.compose_project(project, *args, stream=True)
        if result.returncode != 0:
            raise BuilderError(f"docker compose logs failed (exit {result.returncode})")


TARGET = ComposeTarget()
