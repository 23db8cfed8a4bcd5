"""`python3 -m supervisor ROLE`: the image's entrypoint.

Roles: merge (join the shards), create (register the model with ollama),
serve (run ollama serve, restarting it a bounded number of times), all
(merge, create, then serve, for platforms that run one container), health
(exit 0 when ollama's API answers; the container healthcheck).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from .common import StepError, Stopped, log
from .create import create
from .merge import merge
from .ollama import ollama_env, request, signal_group

RUNTIME_JSON = "/etc/builder/runtime.json"
ROLES = ("merge", "create", "serve", "all", "health")
MAX_RESTARTS = 5
STABLE_SECONDS = 60.0  # a run this long resets the restart budget
RESTART_DELAY = float(os.environ.get("BUILDER_RESTART_DELAY", "0.5"))  # first back-off, doubling


def load_runtime(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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
    state: dict = {"signal": 0, "child": None}

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
        log(f"serve: starting {binary} serve on {os.environ.get('OLLAMA_HOST', '127.0.0.1:11434')}")
        child = subprocess.Popen([binary, "serve"], env=ollama_env(store=runtime.get("ollama_store")), start_new_session=True)
        state["child"] = child
        if stop.is_set():  # the signal came while it was starting
            signal_group(child.pid, state["signal"])
        code = _wait_reaping(child)
        signal_group(child.pid, signal.SIGKILL)  # its runners, if it left any
        state["child"] = None
        if stop.is_set():
            break
        failures = 1 if time.monotonic() - started > STABLE_SECONDS else failures + 1
        if failures > MAX_RESTARTS:
            log(f"serve: ollama serve died {failures} times in a row (last exit {code}); giving up")
            return 1
        delay = min(30.0, RESTART_DELAY * 2 ** (failures - 1))
        log(f"serve: ollama serve exited with status {code}; restart {failures} of {MAX_RESTARTS} in {delay:.1f} s")
        stop.wait(delay)
    log(f"serve: stopped by signal {state['signal']}")
    return 0


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


def health(runtime: dict) -> int:
    base = f"http://127.0.0.1:{runtime['port']}"
    try:
        status, _ = request(base, "GET", "/", timeout=4)
    except OSError as exc:
        print(f"health: {base}/ does not answer: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ROLES:
        print(f"usage: python3 -m supervisor {{{','.join(ROLES)}}}", file=sys.stderr)
        return 2
    role = argv[0]
    path = os.environ.get("BUILDER_RUNTIME", RUNTIME_JSON)
    try:
        runtime = load_runtime(path)
    except (OSError, ValueError) as exc:
        print(f"supervisor: cannot read the runtime plan {path}: {exc}", file=sys.stderr)
        return 2
    if role == "health":
        return health(runtime)

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
