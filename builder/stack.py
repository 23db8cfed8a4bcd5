"""`builder up/down/status/logs`: the rendered stack on Compose v2.

`up` runs the steps one at a time so each exit code is read and each log is
seen: merge, then create (both one-shot), then serve, detached, waited on
until healthy; then the endpoint itself is asked for the model.
"""

from __future__ import annotations

import json
import subprocess
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from builder.errors import BuilderError, ConfigError, Problem
from builder.plan import Plan

ONE_SHOT = ("merge", "create")
LOG_TAIL = 15


@dataclass(frozen=True)
class Endpoint:
    url: str
    model: str


def endpoint_url(plan: Plan) -> str:
    serve = plan.config.serve
    host = "127.0.0.1" if serve.bind in ("0.0.0.0", "::") else serve.bind
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{serve.port}"


def compose_argv(context: Path, *args: str) -> list[str]:
    return ["docker", "compose", "--ansi", "never", "-f", str(context / "compose.yaml"), *args]


def check_storage(plan: Plan) -> None:
    storage = plan.config.storage
    if storage.kind == "local" and not Path(storage.path).is_dir():
        raise ConfigError(
            Problem("storage.local", f"the folder {storage.path} does not exist; create it and put the shards there", None, plan.config.source)
        )


def run_step(context: Path, service: str, echo: Callable[[str], None]) -> None:
    """Run one one-shot service attached, streaming its log; fail with its tail."""
    argv = compose_argv(context, "up", "--no-deps", "--no-log-prefix", "--exit-code-from", service, service)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
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


def up(plan: Plan, context: Path, engine, echo: Callable[[str], None]) -> Endpoint:
    """Bring the stack up and wait until the endpoint lists the model."""
    check_storage(plan)
    _replace_stale_volume(plan, context, engine, echo)
    for service in ONE_SHOT:
        echo(f"{service}: running")
        run_step(context, service, echo)
    echo("serve: starting")
    timeout = plan.config.serve.ready_timeout
    result = engine.compose(context / "compose.yaml", "up", "-d", "--no-deps", "--wait", "--wait-timeout", str(timeout), "serve")
    if result.returncode != 0:
        detail = " ".join(result.stderr.strip().splitlines()[-2:])
        hint = ""
        if "could not select device driver" in detail:
            hint = "; the NVIDIA container toolkit is missing on this host (or set gpus: none)"
        raise BuilderError(f"serve did not start: {detail}{hint}")
    url = endpoint_url(plan)
    wait_for_model(url, plan.config.model.name, timeout)
    return Endpoint(url, plan.config.model.name)


def wait_for_model(url: str, model: str, timeout: float) -> None:
    """Ask the endpoint until it answers and lists the model (httpx + tenacity)."""
    import httpx
    from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

    class NotYet(Exception):
        pass

    def ask() -> None:
        try:
            response = httpx.get(f"{url}/api/tags", timeout=10)
        except httpx.HTTPError as exc:
            raise NotYet(str(exc)) from None
        if response.status_code != 200:
            raise NotYet(f"HTTP {response.status_code}")
        names = {m.get("name") for m in response.json().get("models", [])}
        wanted = model if ":" in model else f"{model}:latest"
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


def _replace_stale_volume(plan: Plan, context: Path, engine, echo) -> None:
    """A volume whose mount options no longer match the config is removed and
    made again (removing a bind or NFS volume definition leaves the data)."""
    name = f"{plan.config.project}_models"
    options = engine.volume_options(name)
    wanted = plan.compose["driver_opts"]
    if options is not None and options != wanted:
        echo(f"volume {name} points elsewhere ({options.get('device')}); recreating it for {wanted.get('device')}")
        engine.compose(context / "compose.yaml", "down")
        engine.remove_volume(name)


def status(plan: Plan, context: Path, engine) -> dict:
    """Each service's state, the endpoint and the model, the image."""
    result = engine.compose(context / "compose.yaml", "ps", "-a", "--format", "json")
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
    url = endpoint_url(plan)
    model_listed = None
    try:
        import httpx

        response = httpx.get(f"{url}/api/tags", timeout=3)
        names = {m.get("name") for m in response.json().get("models", [])}
        wanted = plan.config.model.name if ":" in plan.config.model.name else plan.config.model.name + ":latest"
        model_listed = wanted in names
    except Exception:  # noqa: BLE001 - status reports, it does not fail
        model_listed = None
    return {
        "project": plan.config.project,
        "image": plan.image,
        "image_id": engine.image_id(plan.image),
        "endpoint": url,
        "model": plan.config.model.name,
        "model_listed": model_listed,
        "services": {name: services.get(name, {"state": "absent"}) for name in ("merge", "create", "serve")},
    }
