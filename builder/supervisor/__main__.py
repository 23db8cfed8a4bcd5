"""`python3 -m supervisor ROLE`: the image's entrypoint.

Roles: merge, create, serve, all, health. This is the first cut: merge and
create only announce themselves (the runtime issue makes them real); serve
runs `ollama serve` in the foreground; health asks ollama's API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

RUNTIME_JSON = "/etc/builder/runtime.json"
ROLES = ("merge", "create", "serve", "all", "health")


def log(message: str) -> None:
    print(f"supervisor: {message}", flush=True)


def load_runtime(path: str = RUNTIME_JSON) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def ollama_env() -> dict[str, str]:
    """ollama's environment: without llama.cpp's LD_LIBRARY_PATH, whose
    libggml would shadow the one ollama's runners expect."""
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    return env


def role_merge(runtime: dict) -> int:
    log(f"merge: {runtime['shards']['first']} -> {runtime['merged']} (not yet implemented: nothing done)")
    return 0


def role_create(runtime: dict) -> int:
    log(f"create: {runtime['model']} from {runtime['modelfile']} (not yet implemented: nothing done)")
    return 0


def role_serve(runtime: dict) -> int:
    binary = runtime["ollama"]
    if not os.access(binary, os.X_OK):
        log(f"serve: {binary} is missing or not executable; rebuild the image with `builder build`")
        return 1
    log(f"serve: starting {binary} serve on {os.environ.get('OLLAMA_HOST', '127.0.0.1:11434')}")
    child = subprocess.Popen([binary, "serve"], env=ollama_env())

    def forward(signum, _frame):
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return child.wait()


def role_health(runtime: dict) -> int:
    url = f"http://127.0.0.1:{runtime['port']}/"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"health: {url} does not answer: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ROLES:
        print(f"usage: python3 -m supervisor {{{','.join(ROLES)}}}", file=sys.stderr)
        return 2
    role = argv[0]
    try:
        runtime = load_runtime(os.environ.get("BUILDER_RUNTIME", RUNTIME_JSON))
    except (OSError, ValueError) as exc:
        print(f"supervisor: cannot read the runtime plan: {exc}", file=sys.stderr)
        return 2
    if role == "all":
        for step in (role_merge, role_create):
            code = step(runtime)
            if code:
                return code
        return role_serve(runtime)
    return {"merge": role_merge, "create": role_create, "serve": role_serve, "health": role_health}[role](runtime)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
