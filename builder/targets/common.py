"""What the container targets share: the endpoint and the wait for the
model to be listed, the warm-up's load, the storage the containers write."""

from __future__ import annotations

import json
import os
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from builder.config import Config
from builder.errors import BuilderError, ConfigError, Problem
from builder.render.blueprint import Blueprint


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

def check_storage(blueprint: Blueprint, uid: int | None = None, gid: int | None = None) -> None:
    """Local storage must exist and be writable by the containers' user
    (merge writes the merged file, create ollama's store), unless a model
    cache takes the writes: then the cache must be (it is made when
    missing). `uid`/`gid`: who writes (default: the containers' user)."""
    config = blueprint.config
    storage = config.storage
    uid = config.uid if uid is None else uid
    gid = config.gid if gid is None else gid
    if storage.model_cache:
        check_model_cache(config, Path(storage.model_cache), uid, gid)
    if storage.kind != "local":
        return
    root = Path(storage.path)
    if not root.is_dir():
        raise ConfigError(
            Problem("storage.local", f"the folder {root} does not exist; create it and put the shards there", None, config.source)
        )
    if storage.model_cache:
        return  # only read: the shards' own checks say when one cannot be
    for folder in (root, root / config.model.shards.folder):
        if folder.is_dir() and not writable_by(folder, uid, gid):
            raise ConfigError(
                Problem(
                    "storage.local",
                    f"{folder} is not writable by {_who(config, uid, gid)}; "
                    f"chown -R {uid}:{gid} {root}" + (" (or set image.uid and image.gid)" if uid == config.uid else ""),
                    None,
                    config.source,
                )
            )

def check_model_cache(config: Config, cache: Path, uid: int, gid: int) -> None:
    """storage.model_cache: made when missing (owned by the writer where this
    process may give it away), then writable by the writer."""
    if not cache.exists():
        try:
            cache.mkdir(parents=True)
            if os.geteuid() == 0 and (uid, gid) != (0, 0):
                os.chown(cache, uid, gid)
        except OSError as exc:
            raise ConfigError(Problem("storage.model_cache", f"cannot make {cache}: {exc.strerror}; make it on this machine's "
                                      f"local disk, owned by {uid}:{gid}", None, config.source)) from None
    if not cache.is_dir():
        raise ConfigError(Problem("storage.model_cache", f"{cache} is not a folder; give a folder on this machine's local disk",
                                  None, config.source))
    if not writable_by(cache, uid, gid):
        raise ConfigError(Problem("storage.model_cache", f"{cache} is not writable by {_who(config, uid, gid)}; "
                                  f"chown -R {uid}:{gid} {cache}", None, config.source))


def _who(config: Config, uid: int, gid: int) -> str:
    return f"the containers' user {uid}:{gid}" if (uid, gid) == (config.uid, config.gid) else f"this user ({uid}:{gid})"


def writable_by(path: Path, uid: int, gid: int) -> bool:
    info = path.stat()
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & 0o200)
    if info.st_gid == gid:
        return bool(info.st_mode & 0o020)
    return bool(info.st_mode & 0o002)

def wait_for_model(url: str, model: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    """Ask the endpoint until it answers and lists the model (httpx + tenacity)."""
    from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

    class NotYet(Exception):
        pass

    def ask() -> None:
        names = listed_models(url, headers)
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

def listed_models(url: str, headers: dict[str, str] | None = None) -> set[str] | None:
    """The names /api/tags lists, or None when the endpoint does not answer
    properly. Never through a proxy: the endpoint is on this machine.
    `headers`: the key, with serve.auth: keys (targets.keys.endpoint_headers)."""
    import httpx

    try:
        response = httpx.get(f"{url}/api/tags", timeout=10, trust_env=False, headers=headers or {})
        if response.status_code != 200:
            return None
        return {m.get("name") for m in response.json().get("models", []) if isinstance(m, dict)}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None

@dataclass(frozen=True)
class Load:
    seconds: float
    size: int
    size_vram: int
    read: int = 0  # bytes the runner read while loading
    mode: str | None = None  # mmap or no-mmap
    gpu_held: int | None = None  # what the runner holds, from nvidia-smi

class LoadFailed(BuilderError):
    """The model did not load: exit 1, the stack left up for `builder logs`."""

def container_probe(engine, container: str):
    """(ask, gone) for a supervisor in a container: `health --loaded --json`
    through the engine, and whether the container stopped."""

    def ask() -> tuple[int, str]:
        return engine.exec_in(container, ["python3", "-m", "supervisor", "health", "--loaded", "--json"])

    def gone() -> str | None:
        info = engine.container(container)
        if info is None or info["status"] in ("exited", "dead"):
            return f"the serve container stopped (exit {info and info.get('exit_code')}) before the model loaded"
        return None

    return ask, gone


STEP_LOG_TAIL = 15


def relay_step(step: str, lines, wait: Callable[[], int], echo: Callable[[str], None], after_failure: str) -> None:
    """Show a one-shot step's output as `up` does on every target: the
    supervisor's own lines, progress redrawn on a terminal (and left out of a
    log), then `STEP: done in N s`; a failure is one line with its reason."""
    import sys
    from collections import deque

    tail: deque[str] = deque(maxlen=STEP_LOG_TAIL)
    started = time.monotonic()
    tty = sys.stderr.isatty()
    bar = ""  # the progress line being redrawn on a terminal
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        tail.append(line)
        if _worth_showing(line):
            if bar:
                sys.stderr.write("\r" + " " * len(bar) + "\r")
                bar = ""
            echo(f"  {line.removeprefix('supervisor: ')}")
        elif tty and line.startswith("supervisor: "):
            bar = f"  {step}: {line.removeprefix('supervisor: ')}"[:120]
            sys.stderr.write("\r" + bar)
            sys.stderr.flush()
    if bar:
        sys.stderr.write("\r" + " " * len(bar) + "\r")
    code = wait()
    if code != 0:
        reason = next((l.split("error: ", 1)[1] for l in reversed(tail) if "supervisor: error: " in l), None)
        raise BuilderError(f"{step} failed (exit {code}): {reason or (tail[-1] if tail else 'no output')}; {after_failure}")
    echo(f"{step}: done in {time.monotonic() - started:.1f} s")


def _worth_showing(line: str) -> bool:
    """The supervisor's own lines, without progress (`builder logs` has everything)."""
    if not line.startswith("supervisor: "):
        return False
    text = line.removeprefix("supervisor: ")
    return not (" io read " in text or text.split(" ", 2)[1:2] and text.split(" ", 2)[1].endswith("%"))


SILENT_SUPERVISOR_SECONDS = 120  # a loading record not refreshed this long: the supervisor is gone or wedged


def wait_for_load(blueprint: Blueprint, probe, echo: Callable[[str], None], tty: bool) -> Load:
    """Wait until the supervisor reports the model loaded (`health --loaded
    --json`, asked through `probe`'s ask), showing what the load has read;
    raise with the cause if the load failed or the supervisor is gone.

    No deadline of its own once the load has begun: ollama's load timeout is
    a stall timer, so ollama decides when a load has failed, and the
    supervisor records that. Until the supervisor reports a load at all,
    serve.ready_timeout applies; once it does, `up` gives up only when the
    record says failed, the supervisor is gone, or the record is not
    refreshed for SILENT_SUPERVISOR_SECONDS (the supervisor refreshes it every
    second while loading)."""
    import sys

    model = blueprint.config.model.name
    started = time.monotonic()
    deadline = started + blueprint.config.serve.ready_timeout
    ask, gone = probe
    shown = ""
    next_line, shown_quarter, warned = 0.0, 0, False
    while True:
        code, output = ask()
        try:
            state = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
        except ValueError:
            state = {}
        if code == 0 and state.get("state") == "loaded":
            if tty and shown:
                sys.stderr.write("\n")
            return Load(float(state.get("load_seconds", 0.0)), int(state.get("size", 0)), int(state.get("size_vram", 0)),
                         int(state.get("read") or 0), state.get("mode"))
        if state.get("state") == "failed":
            if tty and shown:
                sys.stderr.write("\n")
            raise LoadFailed(state.get("error") or "unknown cause")
        why = gone()
        if why:
            raise LoadFailed(why)
        elapsed = time.monotonic() - started
        loading = state.get("state") == "loading"
        if loading:
            deadline = math.inf
            silent = time.time() - float(state.get("at") or time.time())
            if silent > SILENT_SUPERVISOR_SECONDS:
                raise LoadFailed(f"the supervisor has not reported on the load for {silent:.0f} s; see `builder logs serve`")
        if state.get("warning") and not warned:
            warned = True
            if tty and shown:
                sys.stderr.write("\n")
                shown = ""
            echo(f"load: warning: {state['warning']}")
        line = load_line(model, state, elapsed)
        if tty:
            sys.stderr.write("\r" + line.ljust(len(shown)))
            sys.stderr.flush()
            shown = line
        else:  # a log: a line a minute, and one at each quarter of the model read
            quarter = load_share(state) // 25
            if time.monotonic() >= next_line or quarter > shown_quarter:
                echo(line)
                shown, next_line, shown_quarter = line, time.monotonic() + 60, quarter
        if time.monotonic() > deadline:
            raise LoadFailed(f"the supervisor did not start loading within serve.ready_timeout ({blueprint.config.serve.ready_timeout} s); "
                             "see `builder logs serve`")
        time.sleep(0.5)


def load_share(state: dict) -> int:
    """How much of the model the load has read, in percent (0 when unknown)."""
    read, total = int(state.get("read") or 0), int(state.get("total") or 0)
    return min(100, read * 100 // total) if total and state.get("state") == "loading" else 0


def load_line(model: str, state: dict, elapsed: float) -> str:
    """`load: NAME 12.3 GiB of 147.0 GiB read (8%), 104.9 MiB/s, 22 min left` (or what is known)."""
    from builder.supervisor.common import human_bytes

    read, total, rate = int(state.get("read") or 0), int(state.get("total") or 0), float(state.get("rate") or 0)
    if state.get("state") != "loading" or not (read or total):
        return f"load: {model} loading, {elapsed:.0f} s"
    parts = [f"load: {model} {human_bytes(read)}" + (f" of {human_bytes(total)} read ({load_share(state)}%)" if total else " read")]
    parts.append(f"{human_bytes(rate)}/s")
    if total and rate > 0 and read < total:
        left = (total - read) / rate
        parts.append(f"{left / 60:.0f} min left" if left >= 90 else f"{left:.0f} s left")
    if float(state.get("idle_s") or 0) >= 10:
        parts.append(f"nothing read for {float(state['idle_s']):.0f} s")
    return ", ".join(parts) + f" ({elapsed:.0f} s)"


def describe_load(blueprint: Blueprint, load: Load) -> str:
    from builder.supervisor.common import CURRENT, human_bytes

    planned = dict(blueprint.config.model.parameters).get("num_gpu")
    share = f"{load.size_vram * 100 // load.size}%" if load.size else "0%"
    current = blueprint.config.ollama_generation == CURRENT
    where = f"{gpu_words(load.size_vram, share, load.gpu_held, current)}" + (f"; planned num_gpu {planned}" if planned is not None else "")
    if blueprint.config.gpus.kind == "none":
        where = "on the CPU (gpus: none)"
    read = f"; {human_bytes(load.read)} read ({load.mode})" if load.mode else ""
    return f"{blueprint.config.model.name} loaded in {load.seconds:.1f} s: {human_bytes(load.size)}, {where}{read}"


def gpu_words(size_vram: int, share: str, held: int | None, current: bool = False) -> str:
    """`14.5 GiB held in GPU memory (nvidia-smi; ollama estimated 8.6 GiB, 30%)`, or ollama's figure alone.
    /api/ps's size_vram is ollama 0.5.7's estimate made before the load; ollama
    0.30+ reports the GPU buffers llama-server logged (weights, KV cache and
    compute buffer, without the CUDA context: seen on an H100, 2026-12-06)."""
    from builder.supervisor.common import human_bytes

    figure = (f"llama-server's GPU buffers {human_bytes(size_vram)} per ollama, {share} of its size" if current
              else f"ollama estimated {human_bytes(size_vram)}, {share} of the model")
    if held:
        return f"{human_bytes(held)} held in GPU memory (nvidia-smi; {figure})"
    if current:
        return f"{human_bytes(size_vram)} ({share}) in GPU memory (llama-server's buffers, per ollama)"
    return f"{human_bytes(size_vram)} ({share}) in GPU memory (ollama's estimate)"

