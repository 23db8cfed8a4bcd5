"""`python3 -m supervisor ROLE`: the image's entrypoint.

Roles: merge (join the shards), create (register the model with ollama),
serve (run ollama serve, restarting it a bounded number of times, and load
the model once it answers), all (merge, create, then serve, for platforms
that run one container), health (exit 0 when ollama's API answers; the
container healthcheck; `health --loaded` only while the model is loaded,
`--json` prints the load's record).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from .common import StepError, Stopped, is_current, log, shard_paths, with_model_cache
from .create import create, created_summary
from .limits import explain, load_timeout_seconds, ollama_limits
from .merge import merge
from .ollama import OllamaChatter, ollama_env, request, signal_group
from .warmup import OutputTail, Warmer, health_loaded

DEFAULT_SERVE = {
    "keep_alive": "-1",
    "load_timeout": {"read_mb_s": 200, "seconds": None},
    "parallel": {"single_above_gib": 16, "value": None},
    "read_ahead": True,
}

RUNTIME_JSON = "/etc/builder/runtime.json"
ROLES = ("merge", "create", "serve", "all", "health")
MAX_RESTARTS = 5
STABLE_SECONDS = 60.0  # a run this long resets the restart budget
RESTART_DELAY = float(os.environ.get("BUILDER_RESTART_DELAY", "0.5"))  # first back-off, doubling


def load_runtime(path: str) -> dict:
    """runtime.json, with the model cache the target gives (BUILDER_MODEL_CACHE)."""
    with open(path, encoding="utf-8") as handle:
        return with_model_cache(json.load(handle), os.environ.get("BUILDER_MODEL_CACHE"))


def serve(runtime: dict) -> int:
    """Run `ollama serve` in the foreground; restart it with back-off when it
    dies, at most MAX_RESTARTS times in a row, then exit non-zero so the
    container's restart policy takes over.

    ollama runs in its own process group, so a signal reaches its runners
    too and a crashed ollama's runners (which hold GPU memory) are killed
    before the next start. As PID 1 the supervisor reaps every child."""
    binary = runtime["ollama"]
    if not os.access(binary, os.X_OK):
        raise StepError(f"serve: {binary} is missing or not executable; rebuild the image with `builder build`")
    stop = threading.Event()
    state: dict = {"signal": 0, "child": None, "generation": 0}
    env, rule, size = serve_environment(runtime)
    gate = gate_settings()
    if gate is not None:  # serve.auth: keys: ollama on loopback, the gate where it would have listened
        env["OLLAMA_HOST"] = f"127.0.0.1:{gate['upstream']}"
        start_gate(gate, stop)
    tail = OutputTail()
    warmer = Warmer(
        local_base(env.get("OLLAMA_HOST", "127.0.0.1:11434")), runtime.get("model", ""), env["OLLAMA_KEEP_ALIVE"],
        load_timeout_seconds(size, rule["load_timeout"]), stop,
        lambda: state["generation"] if state["child"] is not None else None, tail,
        server_pid=lambda: state["child"].pid if state["child"] is not None else None,
        model_bytes=size, auto_timeout=rule["load_timeout"].get("seconds") is None,
        store=runtime.get("ollama_store"), read_ahead=bool(rule.get("read_ahead", True)),
    )
    if runtime.get("model"):
        warmer.record(state="starting")  # a record left by an earlier run (a restarted container) says nothing now
        warmer.start()

    def on_signal(signum, _frame):
        state["signal"] = signum
        stop.set()
        if state["child"] is not None:
            signal_group(state["child"].pid, signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        log(f"serve: starting {binary} serve on {env.get('OLLAMA_HOST', '127.0.0.1:11434')}")
        child = subprocess.Popen([binary, "serve"], env=env, start_new_session=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=_relay, args=(child, tail), daemon=True).start()
        state["generation"] += 1
        state["child"] = child
        if stop.is_set():  # the signal came while it was starting
            signal_group(child.pid, state["signal"])
        code = _wait_reaping(child)
        signal_group(child.pid, signal.SIGKILL)  # its runners, if it left any
        state["child"] = None
        if stop.is_set():
            break
        failures = 1 if time.monotonic() - started > STABLE_SECONDS else failures + 1
        forever = bool(runtime.get("restart_forever"))
        if failures > MAX_RESTARTS and not forever:
            log(f"serve: ollama serve died {failures} times in a row (last exit {code}); giving up")
            return 1
        delay = min(30.0, RESTART_DELAY * 2 ** (min(failures, 16) - 1))
        warmer.count_restart()
        of = "" if forever else f" of {MAX_RESTARTS}"
        log(f"serve: ollama serve exited with status {code}; restart {failures}{of} in {delay:.1f} s")
        stop.wait(delay)
    log(f"serve: stopped by signal {state['signal']}")
    return 0


def local_base(ollama_host: str) -> str:
    """Where this machine reaches ollama bound to OLLAMA_HOST: its own address
    when that is a loopback one (127.0.0.2, ::1), loopback for 0.0.0.0 and ::."""
    import ipaddress

    host, _, port = ollama_host.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://127.0.0.1:{port or 11434}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    elif not address.is_loopback:  # a host address: ollama answers there only
        return f"http://[{host}]:{port or 11434}" if address.version == 6 else f"http://{host}:{port or 11434}"
    return f"http://[{address}]:{port or 11434}" if address.version == 6 else f"http://{address}:{port or 11434}"


def gate_settings() -> dict | None:
    """BUILDER_GATE (serve.auth: keys): where the gate listens, ollama's
    loopback port behind it, the keys file; None without it."""
    text = os.environ.get("BUILDER_GATE")
    if not text:
        return None
    try:
        gate = json.loads(text)
        return {"listen": str(gate["listen"]), "upstream": int(gate["upstream"]), "keys": str(gate["keys"])}
    except (ValueError, KeyError, TypeError):
        raise StepError("serve: BUILDER_GATE is not what builder writes; render the stack again") from None


def start_gate(gate: dict, stop: threading.Event) -> None:
    """The gate in a thread of the serve role: it outlives ollama's restarts.
    A gate that cannot start (its keys file, its port) stops serve: no
    unauthenticated fallback."""
    from .gate import parse_hostport, serve_gate

    host, port = parse_hostport(gate["listen"])
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve_gate(host, port, gate["upstream"], gate["keys"], stop, ready=lambda *_: started.set())
        except BaseException as exc:  # noqa: BLE001 - reported below, in the main thread
            failure.append(exc)
            started.set()
        if not stop.is_set():  # the gate ended by itself: serve must not go on without it
            log(f"serve: the API gate on {gate['listen']} stopped ({failure[-1] if failure else 'no reason given'}); stopping serve")
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=run, name="gate", daemon=True).start()
    started.wait(30)
    if failure or not started.is_set():
        why = failure[0] if failure else "it did not start within 30 s"
        raise StepError(f"serve: the API gate cannot start on {gate['listen']}: {why}")


def model_size(runtime: dict) -> int:
    """What ollama loads: the merged file (0.5.x), else every shard (0.30+ creates from them)."""
    merged = runtime.get("merged", "")
    if not is_current(runtime) and os.path.exists(merged):
        return os.path.getsize(merged)
    total = 0
    for path in shard_paths(runtime) if "shards" in runtime else []:  # a serve-only runtime has none
        try:
            total += os.path.getsize(path)
        except OSError:
            pass
    return total


def serve_environment(runtime: dict) -> tuple[dict[str, str], dict, int]:
    """ollama's environment for serving: its limits sized to the model
    (BUILDER_SERVE's rule; a value set in serve.env wins), release mode."""
    rule = dict(DEFAULT_SERVE)
    try:
        rule.update(json.loads(os.environ.get("BUILDER_SERVE") or "{}"))
    except ValueError:
        log("serve: BUILDER_SERVE is not JSON; using the default limits")
    size = model_size(runtime)
    env = ollama_env(store=runtime.get("ollama_store"))
    env.setdefault("GIN_MODE", "release")
    for (name, value), why in zip(sorted(ollama_limits(size, rule).items()), _explained(size, rule)):
        if name in env:
            log(f"serve: {name}={env[name]} (serve.env; builder's rule would say {value})")
        else:
            env[name] = value
            log(f"serve: {why}")
    return env, rule, size


def _explained(size: int, rule: dict) -> list[str]:
    """explain()'s lines in the sorted order of ollama_limits()."""
    lines = {line.split("=", 1)[0]: line for line in explain(size, rule)}
    return [lines[name] for name in sorted(lines)]


def _relay(child: subprocess.Popen, tail: OutputTail) -> None:
    """ollama's output, line by line, to ours, without its web framework's
    debug lines and its key announcement; the last lines kept for causes."""
    assert child.stdout is not None
    chatter = OllamaChatter()
    for raw in iter(child.stdout.readline, b""):
        line = raw.decode("utf-8", "replace")
        tail.add(line)
        if line.startswith("Couldn't find '") and "Generating new private key" in line:
            log("serve: ollama made its key pair in $HOME/.ollama (it is used only to push models to ollama.com)")
        if chatter.keep(line):
            sys.stdout.write(line)
            sys.stdout.flush()


def _wait_reaping(child: subprocess.Popen) -> int:
    """Wait for `child`, reaping any other child (orphans re-parented to PID 1) meanwhile."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return child.returncode if child.returncode is not None else -1
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode


def _working_role() -> str | None:
    """The role PID 1 runs in this container, when it is merge or create: the
    image's HEALTHCHECK calls those healthy while they work."""
    try:
        with open("/proc/1/cmdline", "rb") as handle:
            args = handle.read().split(b"\0")
    except OSError:
        return None
    words = [a.decode("utf-8", "replace") for a in args if a]
    if len(words) >= 3 and words[-3:-1] == ["-m", "supervisor"] and words[-1] in ("merge", "create"):
        return words[-1]
    return None


def health(runtime: dict, flags: list[str]) -> int:
    if not flags and _working_role():
        return 0
    gate = gate_settings()
    # ollama itself, never the gate: no key needed
    base = f"http://127.0.0.1:{gate['upstream']}" if gate else local_base(os.environ.get("OLLAMA_HOST") or f"127.0.0.1:{runtime['port']}")
    if "--loaded" in flags:
        code, state = health_loaded(base, runtime["model"])
        if "--json" in flags:
            created = created_summary(runtime["ollama_store"], runtime["model"]) if runtime.get("ollama_store") else None
            print(json.dumps(dict(state, create=created) if created else state, sort_keys=True))
        elif code:
            print(f"health: {runtime['model']} is not loaded ({state.get('state')}{': ' + state['error'] if state.get('error') else ''})", file=sys.stderr)
        return code
    try:
        status, _ = request(base, "GET", "/", timeout=4)
    except OSError as exc:
        print(f"health: {base}/ does not answer: {exc}", file=sys.stderr)
        return 1
    if gate and status == 200:  # the endpoint users reach is the gate: it must take connections too
        from .gate import parse_hostport

        host, port = parse_hostport(gate["listen"])
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        try:
            socket.create_connection((host, port), timeout=4).close()
        except OSError as exc:
            print(f"health: the API gate on {gate['listen']} does not take connections: {exc}", file=sys.stderr)
            return 1
    return 0 if status == 200 else 1


class CappedLog:
    """stdout into a file that is rotated to FILE.1 beyond a size (BUILDER_LOG,
    BUILDER_LOG_MAX_BYTES): for the host target, where no engine keeps logs."""

    def __init__(self, path: str, limit: int):
        self.path, self.limit = path, limit
        self.handle = open(path, "a", encoding="utf-8", errors="replace")
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            if self.handle.tell() + len(text) > self.limit:
                self.handle.close()
                os.replace(self.path, self.path + ".1")
                self.handle = open(self.path, "a", encoding="utf-8", errors="replace")
            self.handle.write(text)
            return len(text)

    def flush(self) -> None:
        with self.lock:
            self.handle.flush()

    def isatty(self) -> bool:
        return False


def main(argv: list[str]) -> int:
    if os.environ.get("BUILDER_LOG") and argv[:1] == ["serve"]:
        sys.stdout = sys.stderr = CappedLog(os.environ["BUILDER_LOG"], int(os.environ.get("BUILDER_LOG_MAX_BYTES") or 20 << 20))
    flags = argv[1:]
    if not argv or argv[0] not in ROLES or (flags and (argv[0] != "health" or set(flags) - {"--loaded", "--json"})):
        print(f"usage: python3 -m supervisor {{{','.join(ROLES)}}}  (health [--loaded] [--json])", file=sys.stderr)
        return 2
    role = argv[0]
    path = os.environ.get("BUILDER_RUNTIME", RUNTIME_JSON)
    try:
        runtime = load_runtime(path)
    except (OSError, ValueError) as exc:
        print(f"supervisor: cannot read the runtime plan {path}: {exc}", file=sys.stderr)
        return 2
    if role == "health":
        return health(runtime, flags)

    def stopped(signum, _frame):
        raise Stopped(signum)

    # Until serve takes over the signals: unwind (killing the merge tool or the
    # private ollama, removing temporary files) instead of waiting for SIGKILL.
    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    try:
        if role in ("merge", "all"):
            merge(runtime)
        if role in ("create", "all"):
            create(runtime)
        if role in ("serve", "all"):
            return serve(runtime)
        return 0
    except StepError as exc:
        log(f"error: {exc}")
        return exc.code
    except Stopped as exc:
        log(f"{role}: stopped by signal {exc.signum}; cleaned up")
        return 128 + exc.signum
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        log(f"error: {role}: {where}{exc.strerror or exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
