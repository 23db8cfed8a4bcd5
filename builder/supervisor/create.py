"""The `create` role: register the merged file with ollama from the Modelfile.

`ollama create` needs a running server, so one is started on a private
loopback port and stopped again. A record of what was created (the merged
file's identity and the Modelfile's digest) lets the next run skip without
starting anything, as long as ollama's manifest is still there.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from .common import StepError, file_lock, human_bytes, log, read_json, write_json_atomic
from .ollama import PrivateServer, manifest_path, ollama_env, request

RECORD = ".builder-create.json"


def _identity(runtime: dict) -> dict:
    merged = runtime["merged"]
    try:
        info = os.stat(merged)
    except FileNotFoundError:
        raise StepError(f"create: the merged model {merged} is missing; run the merge step first") from None
    with open(runtime["modelfile"], "rb") as handle:
        modelfile = hashlib.sha256(handle.read()).hexdigest()
    return {
        "merged": {"path": merged, "size": info.st_size, "mtime_ns": info.st_mtime_ns},
        "model": runtime["model"],
        "modelfile_sha256": modelfile,
    }


def _check_space(store: str, size: int) -> None:
    """`ollama create` copies the merged file into its blob store."""
    stats = os.statvfs(store)
    free = stats.f_bavail * stats.f_frsize
    if free < size:
        raise StepError(
            f"create: ollama copies the merged model into {store}, which has {human_bytes(free)} free of the "
            f"{human_bytes(size)} needed; free some space"
        )


def create(runtime: dict) -> int:
    store = runtime["ollama_store"]
    os.makedirs(store, exist_ok=True)
    # Pods sharing the store register the model one at a time; the others then find it done.
    with file_lock(os.path.join(store, ".builder-create.lock"), f"create: another create in {store} is running; waiting for it"):
        return _create_locked(runtime, store)


def _create_locked(runtime: dict, store: str) -> int:
    record_file = os.path.join(store, RECORD)
    identity = _identity(runtime)
    model = runtime["model"]
    records = read_json(record_file) or {}
    if records.get(model) == identity and os.path.isfile(manifest_path(store, model)):
        log(f"create: {model} is up to date with {runtime['merged']} and the Modelfile; nothing to do")
        return 0
    _check_space(store, identity["merged"]["size"])
    log(f"create: registering {model} from {runtime['merged']}")
    with PrivateServer(runtime["ollama"]) as server:
        result = subprocess.run(
            [runtime["ollama"], "create", model, "-f", runtime["modelfile"]],
            env=ollama_env(server.host),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in result.stdout.splitlines():
            if line.strip():
                log(f"create: {line.strip()}")
        if result.returncode != 0:
            raise StepError(f"create: `ollama create {model}` failed (exit {result.returncode})")
        try:
            status, body = request(server.base, "POST", "/api/show", {"model": model})
        except OSError as exc:
            raise StepError(f"create: ollama stopped answering after creating {model} ({exc})") from None
        if status != 200:
            raise StepError(f"create: ollama does not list {model} after creating it (HTTP {status}: {body[:200]!r})")
    records[model] = identity
    write_json_atomic(record_file, records)
    details = json.loads(body or b"{}").get("details") or {}
    facts = ", ".join(str(details[k]) for k in ("family", "parameter_size", "quantization_level") if details.get(k))
    log(f"create: {model} is ready" + (f" ({facts})" if facts else ""))
    return 0
