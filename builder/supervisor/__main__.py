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
import time

from .common import StepError, log
from .create import create
from .merge import merge
from .ollama import ollama_env, request

RUNTIME_JSON = "/etc/builder/runtime.json"
ROLES = ("merge", "create", "serve", "all", "health")
MAX_RESTARTS = 5
STABLE_SECONDS = 60.0  # a run this long resets the restart budget


def load_runtime(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def serve(runtime: dict) -> int:
    """Run `ollama serve` in the foreground; restart it with back-off when it
    dies, at most MAX_RESTARTS times in a row, then exit non-zero so the
    container's restart policy takes over. Signals are forwarded."""
    binary = runtime["ollama"]
    if not os.access(binary, os.X_OK):
        raise StepError(f"serve: {binary} is missing or not executable; rebuild the image with `builder build`")
    stopping = {"signal": 0}
    child: dict[str, subprocess.Popen | None] = {"process": None}

    def forward(signum, _frame):
        stopping["signal"] = signum
        process = child["process"]
        if process is not None and process.poll() is None:
            process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failures = 0
    while True:
        started = time.monotonic()
        log(f"serve: starting {binary} serve on {os.environ.get('OLLAMA_HOST', '127.0.0.1:11434')}")
        child["process"] = subprocess.Popen([binary, "serve"], env=ollama_env())
        code = child["process"].wait()
        _reap()
        if stopping["signal"]:
            log(f"serve: stopped by signal {stopping['signal']}")
            return 0
        failures = 1 if time.monotonic() - started > STABLE_SECONDS else failures + 1
        if failures > MAX_RESTARTS:
            log(f"serve: ollama serve died {failures} times in a row (last exit {code}); giving up")
            return 1
        delay = min(30.0, 0.5 * 2 ** (failures - 1))
        log(f"serve: ollama serve exited with status {code}; restart {failures} of {MAX_RESTARTS} in {delay:.1f} s")
        time.sleep(delay)


def _reap() -> None:
    """As PID 1, collect any orphaned children so none stay zombies."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


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
    try:
        if role == "health":
            return health(runtime)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
