"""The `create` role: register the merged file with ollama without copying it.

ollama's own `ollama create` reads the file twice (hash, upload) and its
server writes a third copy into the blob store. Here the sha256 comes from
the merge (computed as the file was written), the file is placed in the
store as `blobs/sha256-HEX` by a hard link (the store is on the same
volume), ollama confirms it has the blob (`HEAD /api/blobs/...`), and
`POST /api/create` names it in `files`, with the Modelfile's template,
system and parameters. Where a link is impossible, the file is uploaded as
the documented API has it, and the log says so. Pruning is off (the private
server runs with OLLAMA_NOPRUNE), so the blob is safe before the manifest
names it.

A record of what was created lets the next run skip without starting
anything, as long as ollama's manifest is still there.

After a create that replaced an earlier version of the model, the blobs of
that version which no manifest in the store references any more are removed
(the previous merged file's hard link above all: 150 GB for an R1 quant).
ollama would do it itself, but only with pruning on, which the private
server must keep off. A blob another model uses is never touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import urllib.request

from .common import StepError, file_lock, human_bytes, io_counters, log, read_json, write_json_atomic
from .merge import merged_digest
from .ollama import PrivateServer, manifest_path, request

RECORD = ".builder-create.json"


def _identity(runtime: dict) -> dict:
    merged = runtime["merged"]
    try:
        info = os.stat(merged)
    except FileNotFoundError:
        raise StepError(f"create: the merged model {merged} is missing; run the merge step first") from None
    request_body = json.dumps(runtime.get("create", {}), sort_keys=True).encode()
    return {
        "merged": {"path": merged, "size": info.st_size, "mtime_ns": info.st_mtime_ns},
        "model": runtime["model"],
        "request_sha256": hashlib.sha256(request_body).hexdigest(),
    }


def create(runtime: dict) -> int:
    store = runtime["ollama_store"]
    os.makedirs(store, exist_ok=True)
    # Pods sharing the store register the model one at a time; the others then find it done.
    with file_lock(os.path.join(store, ".builder-create.lock"), f"create: another create in {store} is running; waiting for it"):
        return _create_locked(runtime, store)


def place_blob(merged: str, store: str, digest: str) -> str:
    """Put the merged file in ollama's blob store; say how ('present', 'linked', or why not)."""
    blobs = os.path.join(store, "blobs")
    os.makedirs(blobs, exist_ok=True)
    blob = os.path.join(blobs, f"sha256-{digest}")
    if os.path.exists(blob):
        if os.path.getsize(blob) == os.path.getsize(merged):
            return "present"
        os.unlink(blob)  # a partial upload from an earlier run: ollama's own temp would be misnamed
    tmp = os.path.join(blobs, f".sha256-{digest}.link-{os.getpid()}")
    try:
        os.link(merged, tmp)
        os.replace(tmp, blob)
        return "linked"
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            return f"not linked ({exc.strerror})"
        raise


def upload_blob(base: str, merged: str, digest: str) -> None:
    """The documented path: POST the file to /api/blobs (ollama writes a copy)."""
    size = os.path.getsize(merged)
    with open(merged, "rb") as body:
        req = urllib.request.Request(
            f"{base}/api/blobs/sha256:{digest}", data=body, method="POST",
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(req, timeout=None) as response:
            if response.status not in (200, 201):
                raise StepError(f"create: uploading {merged} answered HTTP {response.status}")


def _check_space(store: str, size: int) -> None:
    """Only the copying path needs room for another copy."""
    stats = os.statvfs(store)
    free = stats.f_bavail * stats.f_frsize
    if free < size:
        raise StepError(
            f"create: ollama would copy the merged model into {store}, which has {human_bytes(free)} free of the "
            f"{human_bytes(size)} needed; put the store on the model's filesystem or free some space"
        )


def manifest_digests(path: str) -> set[str]:
    """The hex digests of a manifest's config and layers (empty if there is none)."""
    data = read_json(path)
    if not isinstance(data, dict):
        return set()
    entries = [data.get("config") or {}] + list(data.get("layers") or [])
    return {str(e.get("digest", "")).partition(":")[2] for e in entries if isinstance(e, dict) and e.get("digest")}


def referenced_digests(store: str) -> set[str] | None:
    """Every digest any manifest in the store names; None if a manifest cannot be read."""
    found: set[str] = set()
    for folder, _dirs, files in os.walk(os.path.join(store, "manifests")):
        for name in files:
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
            except (OSError, ValueError):
                return None
            found |= manifest_digests(path) if isinstance(data, dict) else set()
    return found


def remove_unreferenced(store: str, candidates: set[str], model: str) -> None:
    """Remove the blobs among `candidates` (what the replaced version of
    `model` used) that no manifest references now."""
    if not candidates:
        return
    referenced = referenced_digests(store)
    if referenced is None:
        log(f"create: a manifest in {store}/manifests cannot be read; the blobs the old {model} used are kept")
        return
    freed = 0
    for digest in sorted(candidates - referenced):
        blob = os.path.join(store, "blobs", f"sha256-{digest}")
        try:
            size = os.stat(blob).st_size
            os.unlink(blob)
        except FileNotFoundError:
            continue
        freed += size
        log(f"create: removed blob sha256-{digest[:12]}... ({human_bytes(size)}): the old {model} used it and no model does now")
    if freed:
        log(f"create: {human_bytes(freed)} of blobs the old {model} left behind removed")


def _show_private_log(server: PrivateServer) -> None:
    """The private ollama's last words, after a failed create."""
    tail = server.log_tail(20)
    if tail.strip():
        log(f"create: the private ollama's last lines (all of them in {server.log_path}):")
        for line in tail.splitlines():
            print(f"    {line}", flush=True)


def _create_locked(runtime: dict, store: str) -> int:
    record_file = os.path.join(store, RECORD)
    identity = _identity(runtime)
    model = runtime["model"]
    records = read_json(record_file) or {}
    if records.get(model) == identity and os.path.isfile(manifest_path(store, model)):
        log(f"create: {model} is up to date with {runtime['merged']} and its create request; nothing to do")
        return 0
    merged = runtime["merged"]
    digest = merged_digest(merged)
    previous = manifest_digests(manifest_path(store, model))
    log(f"create: registering {model} from {merged} (sha256 {digest[:12]}...)")
    before = io_counters()
    how = place_blob(merged, store, digest)
    server_ref: list = []
    try:
        with PrivateServer(runtime["ollama"], store) as server:
            server_ref.append(server)
            server_before = io_counters(str(server.process.pid)) if server.process else (0, 0)
            status, _ = request(server.base, "HEAD", f"/api/blobs/sha256:{digest}")
            if status != 200:
                _check_space(store, identity["merged"]["size"])
                log(f"create: blob {how}; uploading {human_bytes(identity['merged']['size'])} to ollama (it keeps a copy)")
                upload_blob(server.base, merged, digest)
            else:
                log(f"create: blob {how} in {store}/blobs: no copy")
            body = dict(runtime.get("create", {}), model=model, files={os.path.basename(merged): f"sha256:{digest}"}, stream=False)
            status, answer = request(server.base, "POST", "/api/create", body, timeout=3600)
            if status != 200:
                raise StepError(f"create: ollama refused to create {model} (HTTP {status}: {answer[:300]!r})")
            try:
                status, shown = request(server.base, "POST", "/api/show", {"model": model})
            except OSError as exc:
                raise StepError(f"create: ollama stopped answering after creating {model} ({exc})") from None
            if status != 200:
                raise StepError(f"create: ollama does not list {model} after creating it (HTTP {status}: {shown[:200]!r})")
            server_after = io_counters(str(server.process.pid)) if server.process else (0, 0)
    except StepError:
        _show_private_log(server_ref[0] if server_ref else PrivateServer(runtime["ollama"], store))
        raise
    records[model] = identity
    write_json_atomic(record_file, records)
    remove_unreferenced(store, previous - {digest}, model)
    after = io_counters()
    details = json.loads(shown or b"{}").get("details") or {}
    facts = ", ".join(str(details[k]) for k in ("family", "parameter_size", "quantization_level") if details.get(k))
    log(f"create: {model} is ready" + (f" ({facts})" if facts else ""))
    read = after[0] - before[0] + server_after[0] - server_before[0]
    written = after[1] - before[1] + server_after[1] - server_before[1]
    log(f"create: io read {read} written {written} bytes")
    return 0
