"""The `host` target: everything as ordinary processes on this machine, no
container engine. For rented GPU containers (AutoDL, Cloudpods) where there is
no Docker and no systemd, the model sits on a mounted disk, and the reference
deployment was `nohup ollama serve &`.

`up` fetches and checks the release archives as `build` does (lock, mirrors,
`--offline --from`), stages them into a per-project prefix, lays out the
supervisor and its runtime file there as the image has them (with this
machine's paths), runs merge and create in the foreground, then starts serve
detached (its own session: it survives the terminal and the SSH connection),
with a pid file and a size-capped log. Nothing is written outside the prefix,
the model storage, the download cache and builder.lock beside the config
(the archives' digests, which every later run and build must match).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from builder.errors import BuilderError, ConfigError, Problem
from builder.render.blueprint import Blueprint, gate_env, keys_file
from builder.supervisor.common import with_model_cache
from builder.targets.base import Target
from builder.targets.common import Endpoint, full_name, listed_models, relay_step
from builder.targets.status import load_failed, loaded_model, with_runner_memory
from builder.targets.keys import endpoint_headers

LOG_MAX_BYTES = 20 << 20  # the serve log is rotated to serve.log.1 beyond this
STOP_SECONDS = 30


def prefix_for(blueprint: Blueprint) -> Path:
    """Where the host target keeps its files: host.prefix, else $XDG_DATA_HOME/builder/PROJECT."""
    return _prefix(blueprint.config.project, blueprint.config)


def host_runtime(blueprint: Blueprint, prefix: Path) -> dict:
    """The image's runtime.json with this machine's paths."""
    storage = Path(blueprint.config.storage.path)
    runtime = json.loads(json.dumps(blueprint.runtime))

    def here(path: str) -> str:
        return str(storage / Path(path).relative_to(runtime["models_dir"]))

    runtime["merged"] = here(runtime["merged"])
    runtime["shards"]["first"] = here(runtime["shards"]["first"])
    runtime["ollama_store"] = here(runtime["ollama_store"])
    runtime["models_dir"] = str(storage)
    runtime = with_model_cache(runtime, blueprint.config.storage.model_cache)  # the paths are this machine's already
    runtime["ollama"] = str(prefix / "staged" / "ollama" / "bin" / "ollama")
    runtime["gguf_split"] = str(prefix / "staged" / "llama.cpp" / "llama.cpp" / "build" / "bin" / "llama-gguf-split")
    runtime["modelfile"] = str(prefix / "Modelfile")
    runtime["port"] = blueprint.config.serve.port
    runtime["restart_forever"] = True  # no restart policy above it on a plain host
    return runtime


def host_env(blueprint: Blueprint, prefix: Path, runtime: dict) -> dict[str, str]:
    """The supervisor's environment, as the image's ENV and the target's settings give it."""
    config = blueprint.config
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "BUILDER_"))}
    env.update(
        PYTHONPATH=str(prefix),
        PYTHONDONTWRITEBYTECODE="1",
        BUILDER_RUNTIME=str(prefix / "runtime.json"),
        BUILDER_STATE_DIR=str(prefix / "run"),
        BUILDER_LOG=str(prefix / "run" / "serve.log"),
        BUILDER_LOG_MAX_BYTES=str(LOG_MAX_BYTES),
        LD_LIBRARY_PATH=str(Path(runtime["gguf_split"]).parent),
        # ollama looks for libcuda and libcudart along LD_LIBRARY_PATH too:
        # where this machine's CUDA is found only through it, ollama gets it.
        BUILDER_OLLAMA_LD_LIBRARY_PATH=os.environ.get("LD_LIBRARY_PATH", ""),
        OLLAMA_HOST=f"{_bracketed(config.serve.bind)}:{config.serve.port}",
        OLLAMA_MODELS=runtime["ollama_store"],
        HOME=str(prefix / "run" / "home"),
    )
    env.update(blueprint.compose["create_env"])
    env.update(blueprint.compose["serve_env"])
    env.pop("BUILDER_MODEL_CACHE", None)  # the containers' path; runtime.json holds this machine's
    env.pop("BUILDER_GATE", None)  # the containers' own; here: this machine's port and keys
    env.update(gate_env(config, f"{_bracketed(config.serve.bind)}:{config.serve.port}", config.serve.port + 1, host_keys_file(blueprint)))
    gpus = config.gpus
    if gpus.kind == "none":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif gpus.kind == "ids":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.ids)
    elif gpus.kind == "count":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus.count))
    return env


def _bracketed(address: str) -> str:
    """An IPv6 address in brackets, as HOST:PORT needs it."""
    return f"[{address}]" if ":" in address else address


def host_keys_file(blueprint: Blueprint) -> str:
    """serve.keys_file, else the prefix's api-keys."""
    return keys_file(blueprint.config, str(prefix_for(blueprint)))


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def read_pidfile(prefix: Path) -> dict | None:
    """The recorded serve process, if it still is that process: a pid that is
    gone, or reused by another program (another start time), is not trusted."""
    try:
        record = json.loads((prefix / "run" / "serve.pid").read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _start_time(pid) != record.get("start_time"):
        return None
    return record


def _uptime(record: dict) -> float:
    try:
        boot = float(open("/proc/stat").read().split("btime ", 1)[1].split()[0])
        return time.time() - (boot + record["start_time"] / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class HostTarget(Target):
    """Ordinary processes on this machine: no container engine needed."""

    name = "host"
    needs_engine = False
    ram_scope = "cgroup"  # serve runs in this process's cgroup

    def check(self, blueprint: Blueprint) -> None:
        config = blueprint.config
        if config.storage.kind != "local":
            raise ConfigError(Problem(
                "storage", "the host target reads the model from a folder on this machine: mount the NFS export and set storage.local to it",
                None, config.source,
            ))
        if config.storage.model_cache:
            from builder.targets.common import check_model_cache

            check_model_cache(config, Path(config.storage.model_cache), os.geteuid(), os.getegid())
            return
        root = Path(config.storage.path)
        for folder in (root, root / config.model.shards.folder):  # merge writes beside the shards, create the store
            if folder.is_dir() and not os.access(folder, os.W_OK):
                raise ConfigError(Problem(
                    "storage.local", f"{folder} is not writable here (merge and create write the merged model and ollama's store "
                    "there); make it writable, or set storage.model_cache to a folder on this machine's disk", None, config.source,
                ))

    def prepare(self, blueprint: Blueprint, context: Path, config_path: str, fetch_settings, engine, force_build: bool, echo) -> None:
        """Fetch and stage the release archives into the prefix; lay out the supervisor."""
        from builder.image.build import fetch_and_stage
        from builder.render.files import supervisor_files
        from builder.fsutil import write_atomic

        config = blueprint.config
        prefix = prefix_for(blueprint)
        (prefix / "run" / "home").mkdir(parents=True, exist_ok=True)
        fetch_and_stage(config_path, config, prefix, fetch_settings, None, False, echo)
        for name, data in supervisor_files().items():
            write_atomic(prefix / "supervisor" / Path(name).name, data)
        runtime = host_runtime(blueprint, prefix)
        write_atomic(prefix / "runtime.json", (json.dumps(runtime, indent=2, sort_keys=True) + "\n").encode())
        write_atomic(prefix / "Modelfile", blueprint.modelfile.encode())

    def up(self, blueprint: Blueprint, context: Path, engine, echo) -> Endpoint:
        prefix = prefix_for(blueprint)
        runtime = json.loads((prefix / "runtime.json").read_text())
        env = host_env(blueprint, prefix, runtime)
        for role in ("merge", "create"):
            process = subprocess.Popen([sys.executable, "-m", "supervisor", role], env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            assert process.stdout is not None
            relay_step(role, process.stdout, process.wait, echo, "serve was not started")
        wanted = blueprint.config_digest + ":" + _digest(runtime, env)
        record = read_pidfile(prefix)
        if record and record.get("config") == wanted:
            echo(f"serve: already running with this config (pid {record['pid']})")
        else:
            if record:
                echo(f"serve: the config changed; stopping pid {record['pid']}")
                self._stop(prefix, record)
            _refuse_taken_port(blueprint)
            self._start(prefix, env, wanted, echo)
        url = local_url(blueprint)
        _wait_for_our_model(prefix, url, blueprint.config.model.name, float(blueprint.config.serve.ready_timeout),
                            endpoint_headers(blueprint, "host"))
        return Endpoint(url, blueprint.config.model.name)

    def _start(self, prefix: Path, env: dict[str, str], wanted: str, echo) -> None:
        run = prefix / "run"
        (run / "serve.pid").unlink(missing_ok=True)
        (run / "builder-serve-state.json").unlink(missing_ok=True)
        with open(os.devnull, "rb") as devnull:
            process = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "serve"], env=env, stdin=devnull,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        start = None
        for _ in range(100):
            start = _start_time(process.pid)
            if start is not None:
                break
            time.sleep(0.01)
        record = {"pid": process.pid, "start_time": start, "config": wanted}
        tmp = run / f".serve.pid.{os.getpid()}"
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, run / "serve.pid")
        echo(f"serve: started (pid {process.pid}); log: {run / 'serve.log'}")

    def _stop(self, prefix: Path, record: dict) -> None:
        pid = int(record["pid"])
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + STOP_SECONDS
        while _start_time(pid) == record["start_time"] and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _start_time(pid) == record["start_time"]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(pid)
        (prefix / "run" / "serve.pid").unlink(missing_ok=True)

    def probe(self, blueprint: Blueprint, context: Path, engine):
        """(ask, gone) for the detached supervisor: its `health --loaded --json`, its pid."""
        prefix = prefix_for(blueprint)
        runtime = json.loads((prefix / "runtime.json").read_text())
        env = host_env(blueprint, prefix, runtime)
        env.pop("BUILDER_LOG", None)

        def ask() -> tuple[int, str]:
            result = subprocess.run([sys.executable, "-m", "supervisor", "health", "--loaded", "--json"], env=env,
                                    capture_output=True, text=True, stdin=subprocess.DEVNULL)
            return result.returncode, result.stdout

        def gone() -> str | None:
            return None if read_pidfile(prefix) else f"the serve process is gone (see {prefix / 'run' / 'serve.log'})"

        return ask, gone

    def state_file(self, blueprint: Blueprint) -> Path:
        return prefix_for(blueprint) / "run" / "builder-serve-state.json"

    def logs_hint(self, blueprint: Blueprint) -> str:
        return "builder logs --target host"

    def down(self, project: str, engine, volumes: bool, config=None) -> str:
        prefix = _prefix(project, config)
        record = read_pidfile(prefix)
        if record:
            self._stop(prefix, record)
            return f"stopped serve (pid {record['pid']}) of {project}; its files stay in {prefix}"
        (prefix / "run" / "serve.pid").unlink(missing_ok=True)
        return f"nothing to stop: no serve of {project} runs from {prefix}"

    def status(self, blueprint: Blueprint, engine, lock_sha256: str | None) -> dict:
        from builder.preflight.where import model_bytes_here, reads
        from builder.supervisor.create import created_summary

        prefix = prefix_for(blueprint)
        record = read_pidfile(prefix)
        try:
            state = json.loads((prefix / "run" / "builder-serve-state.json").read_text())
        except (OSError, ValueError):
            state = {}
        serve = {"state": "absent"} if record is None else {
            "state": "running", "pid": record["pid"], "uptime_s": round(_uptime(record)), "restarts": state.get("restarts", 0),
        }
        records = {}
        runtime = host_runtime(blueprint, prefix)
        for name, path in (("merge", Path(runtime["merged"] + ".merge.json")),
                           ("create", Path(runtime["ollama_store"]) / ".builder-create.json")):
            try:
                records[name] = {"state": "done", "record": str(path), "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime))}
            except OSError:
                records[name] = {"state": "absent"}
        if runtime.get("ollama_generation"):  # ollama 0.30+ creates from the shards
            records["merge"] = {"state": "none needed (this ollama reads the shards)"}
        url = local_url(blueprint)
        names = listed_models(url, endpoint_headers(blueprint, "host"))
        listed = None if names is None else full_name(blueprint.config.model.name) in names
        return {
            "project": blueprint.config.project,
            "target": "host",
            "prefix": str(prefix),
            "image": "(none: the host target runs without a container engine)",
            "image_id": None,
            "image_stale": None,
            "endpoint": url,
            "model": blueprint.config.model.name,
            "model_listed": listed,
            "loaded": with_runner_memory(loaded_model(url, blueprint.config.model.name, endpoint_headers(blueprint, "host")) if listed else None,
                                         blueprint.config),
            "created": created_summary(runtime["ollama_store"], runtime["model"]),  # read locally
            "load_failed": load_failed(state if isinstance(state, dict) else {}),
            "reads": reads(blueprint.config, model_bytes_here(blueprint.config)),
            "services": {**records, "serve": serve},
        }

    def logs(self, project: str, engine, service: str | None, follow: bool, tail: str, config=None) -> None:
        log = _prefix(project, config) / "run" / "serve.log"
        if not log.exists():
            raise BuilderError(f"no log at {log}: the host target's serve has not run here")
        argv = ["tail", "-n", "+1" if tail == "all" else tail] + (["-F"] if follow else []) + [str(log)]
        subprocess.run(argv)


def _refuse_taken_port(blueprint: Blueprint) -> None:
    """Before serve starts: another program answering on serve.port (a foreign
    ollama listing a model of the same name would pass for ours) is refused."""
    import socket

    serve = blueprint.config.serve
    host = "127.0.0.1" if serve.bind in ("0.0.0.0", "::") else serve.bind
    ports = [(host, serve.port)] + ([("127.0.0.1", serve.port + 1)] if serve.auth == "keys" else [])
    for address, port in ports:  # with keys, ollama listens on serve.port + 1 behind the gate
        try:
            with socket.create_connection((address, port), timeout=2):
                pass
        except OSError:
            continue
        raise BuilderError(f"port {port} on {address} is taken by another program (not this project's serve); "
                           "stop it (an `ollama serve` of your own?) or set serve.port"
                           + (" (with serve.auth: keys, ollama uses serve.port + 1 behind the gate)" if port != serve.port else ""))


def _wait_for_our_model(prefix: Path, url: str, model: str, timeout: float, headers: dict[str, str]) -> None:
    """Until the endpoint lists the model, while our serve is alive: a serve
    that died is reported at once, with the end of its log."""
    deadline = time.monotonic() + timeout
    wanted = full_name(model)
    while True:
        if read_pidfile(prefix) is None:
            log = prefix / "run" / "serve.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise BuilderError(f"serve stopped before {url} listed {model} ({tail[0] if tail else 'no log'}); see `builder logs --target host`")
        names = listed_models(url, headers)
        if names is not None and wanted in names:
            return
        if time.monotonic() > deadline:
            found = "no answer" if names is None else f"{wanted} is not listed"
            raise BuilderError(f"{url} did not list {model} within {timeout:.0f} s ({found}); see `builder logs --target host`")
        time.sleep(0.25)


def local_url(blueprint: Blueprint) -> str:
    """Where this machine reaches the API ollama binds to serve.bind:serve.port."""
    bind = blueprint.config.serve.bind
    host = "127.0.0.1" if bind in ("0.0.0.0", "::") else (f"[{bind}]" if ":" in bind else bind)
    return f"http://{host}:{blueprint.config.serve.port}"


def _prefix(project: str, config) -> Path:
    """The prefix from the config when it loads, else the default for the project."""
    if config is not None and config.host_prefix:
        return Path(config.host_prefix)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "builder" / project


def _digest(runtime: dict, env: dict[str, str]) -> str:
    import hashlib

    keep = {k: v for k, v in env.items() if k.startswith(("OLLAMA_", "BUILDER_SERVE", "CUDA_"))}
    return hashlib.sha256(json.dumps([runtime, keep], sort_keys=True).encode()).hexdigest()[:16]


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


TARGET = HostTarget()
