"""The `create` role: register the model with ollama, copying as little as
ollama allows.

ollama 0.30 and later (runtime.json's ollama_generation "0.30") create from
the shards themselves: see create_shards.py. The rest of this docstring is
ollama 0.5.x, where the merge step joined the shards.

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

import json
import os
import urllib.request

from .common import StepError, file_lock, human_bytes, io_counters, is_current, log, open_loopback, place_blob, read_json, write_json_atomic
from .create_shards import create_request, place_shards, remember_new_times, remove_ollama_temporaries, request_digest, shard_identity
from .merge import merged_digest
from .ollama import PrivateServer, create_streamed, manifest_path, request

RECORD = ".builder-create.json"


def _identity(runtime: dict) -> dict:
    if is_current(runtime):
        return shard_identity(runtime)
    merged = runtime["merged"]
    try:
        info = os.stat(merged)
    except FileNotFoundError:
        raise StepError(f"create: the merged model {merged} is missing; run the merge step first") from None
    return {
        "merged": {"path": merged, "size": info.st_size, "mtime_ns": info.st_mtime_ns},
        "model": runtime["model"],
        "request_sha256": request_digest(runtime),
    }


def create(runtime: dict) -> int:
    store = runtime["ollama_store"]
    os.makedirs(store, exist_ok=True)
    # Pods sharing the store register the model one at a time; the others then find it done.
    with file_lock(os.path.join(store, ".builder-create.lock"), f"create: another create in {store} is running; waiting for it"):
        return _create_locked(runtime, store)


def upload_blob(base: str, merged: str, digest: str) -> None:
    """The documented path: POST the file to /api/blobs (ollama writes a copy)."""
    size = os.path.getsize(merged)
    with open(merged, "rb") as body:
        req = urllib.request.Request(
            f"{base}/api/blobs/sha256:{digest}", data=body, method="POST",
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        with open_loopback(req, timeout=None) as response:
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


def remove_unreferenced(store: str, candidates: set[str], model: str, quiet: set[str] = frozenset()) -> None:
    """Remove the blobs among `candidates` (what the replaced version of
    `model` used, and the shards linked in for this create) that no manifest
    references now; `quiet` ones are not logged one by one."""
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
        if digest in quiet:
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


def created_summary(store: str, model: str) -> dict | None:
    """How the model was created, for `builder status`: {"path": "merged" (the
    merged file) or "shards" (ollama 0.30+ rewrote them), "inputs": files
    named, "written": bytes of ollama's rewrite, "uploaded": bytes copied
    because a hard link was impossible}; None if unknown."""
    record = (read_json(os.path.join(store, RECORD)) or {}).get(model)
    if not isinstance(record, dict) or "path" not in record:
        return None
    return {key: record.get(key) for key in ("path", "inputs", "written", "uploaded")}


def _create_locked(runtime: dict, store: str) -> int:
    record_file = os.path.join(store, RECORD)
    identity = _identity(runtime)
    model = runtime["model"]
    records = read_json(record_file) or {}
    current = is_current(runtime)
    source = f"its {len(identity['shards'])} shard(s)" if current else runtime["merged"]
    entry = records.get(model)
    recorded = entry.get("identity", entry) if isinstance(entry, dict) else None  # older records were the identity itself
    if recorded == identity and os.path.isfile(manifest_path(store, model)):
        log(f"create: {model} is up to date with {source} and its create request; nothing to do")
        return 0
    if current and os.path.isfile(manifest_path(store, model)):
        if _only_the_request_changed(recorded, identity, entry, create_request(runtime)):
            return _recreate_from_itself(runtime, store, records, identity)
        dropped = _dropped_keys(entry, create_request(runtime)) if _same_shards(recorded, identity) else []
        if dropped:
            log(f"create: the config no longer sets {', '.join(dropped)}; ollama keeps what the old {model} set when it "
                f"creates a model from itself, so {model} is created from its shards again (ollama rewrites them all). "
                f"Next time, keep {'it' if len(dropped) == 1 else 'them'} in the config with the value you want instead")
    previous = manifest_digests(manifest_path(store, model))
    before = io_counters()
    placed: dict[str, tuple[str, str]] = {}
    try:
        if current:
            remove_ollama_temporaries(store)
            files = place_shards(runtime, store, identity, placed)
        else:
            merged = runtime["merged"]
            digest = merged_digest(merged)
            log(f"create: registering {model} from {merged} (sha256 {digest[:12]}...)")
            files = {os.path.basename(merged): digest}
            placed = {digest: (merged, place_blob(merged, store, digest))}
        shown = _register(runtime, store, files, placed, current)
    finally:
        # Worked or not, the links and uploaded copies no manifest names go, and
        # the shards' times are recorded: ollama 0.30+ set them through the links
        # (else the next run hashes 150 GB again; a no-op for 0.5.x's merged file).
        remember_new_times(store, [path for path, _ in placed.values()])
        remove_unreferenced(store, set(placed) - manifest_digests(manifest_path(store, model)), model, quiet=set(placed))
    now = manifest_digests(manifest_path(store, model))
    written = _new_model_bytes(store, now, set(placed)) if current else 0
    if current:
        identity = shard_identity(runtime)
    uploaded = sum(os.path.getsize(path) for path, how in placed.values() if how not in ("linked", "present"))
    records[model] = {"identity": identity, "path": "shards" if current else "merged", "inputs": len(placed),
                      "written": written, "uploaded": uploaded, "request": create_request(runtime)}
    write_json_atomic(record_file, records)
    remove_unreferenced(store, previous - now, model)
    after = io_counters()
    details = json.loads(shown or b"{}").get("details") or {}
    facts = ", ".join(str(details[k]) for k in ("family", "parameter_size", "quantization_level") if details.get(k))
    log(f"create: {model} is ready" + (f" ({facts})" if facts else ""))
    if current:
        log(f"create: ollama rewrote the {len(placed)} shard(s) into one blob of {human_bytes(written)} "
            "(llama-quantize COPY, then a copy under its digest); the shards stay where they are")
    # /proc/self/io counts the reaped private ollama and its llama-quantize too.
    log(f"create: io read {after[0] - before[0]} written {after[1] - before[1]} bytes, ollama's included")
    return 0


def _same_shards(recorded: dict | None, identity: dict) -> bool:
    """The recorded identity is this one but for the create request."""
    if not isinstance(recorded, dict):
        return False
    return {k: v for k, v in recorded.items() if k != "request_sha256"} == {k: v for k, v in identity.items() if k != "request_sha256"}


def _dropped_keys(entry, request: dict) -> list[str]:
    """What the recorded request set and this one does not: parameters
    (`parameters.NAME`), `template`, `system`."""
    if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
        return []
    old = entry["request"]
    gone = [f"model.parameters.{k}" for k in sorted(set(old.get("parameters") or {}) - set(request.get("parameters") or {}))]
    return gone + [f"model.{key}" for key in ("template", "system") if key in old and key not in request]


def _only_the_request_changed(recorded: dict | None, identity: dict, entry, request: dict) -> bool:
    """The shards are as they were and the new request keeps every parameter,
    the template and the system prompt the old one set: ollama 0.30+ can then
    create the model from itself (its parameters merge into the old ones, so
    a dropped one would survive: then the shards are created again)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict) or not _same_shards(recorded, identity):
        return False
    return not _dropped_keys(entry, request)


def _recreate_from_itself(runtime: dict, store: str, records: dict, identity: dict) -> int:
    """ollama 0.30+, same shards, another request (num_gpu planned for other
    GPUs, say): create the model from itself, which writes a new manifest and
    small layers instead of rewriting every GGUF (150 GB for R1)."""
    model = runtime["model"]
    request = create_request(runtime)
    previous = manifest_digests(manifest_path(store, model))
    log(f"create: only the create request changed; creating {model} from itself (the model's weights are not rewritten)")
    server_ref: list = []
    try:
        with PrivateServer(runtime["ollama"], store) as server:
            server_ref.append(server)
            create_streamed(server.base, dict(request, model=model, **{"from": model}))
            status, shown = request_show(server.base, model)
    except StepError:
        _show_private_log(server_ref[0] if server_ref else PrivateServer(runtime["ollama"], store))
        raise
    now = manifest_digests(manifest_path(store, model))
    records[model] = dict(records[model], identity=identity, request=request)
    write_json_atomic(os.path.join(store, RECORD), records)
    remove_unreferenced(store, previous - now, model)
    log(f"create: {model} is ready (new parameters, same weights)")
    return 0


def request_show(base: str, model: str) -> tuple[int, bytes]:
    """/api/show of the model just created, or a StepError saying why not."""
    try:
        status, shown = request(base, "POST", "/api/show", {"model": model})
    except OSError as exc:
        raise StepError(f"create: ollama stopped answering after creating {model} ({exc})") from None
    if status != 200:
        raise StepError(f"create: ollama does not list {model} after creating it (HTTP {status}: {shown[:200]!r})")
    return status, shown


def _register(runtime: dict, store: str, files: dict[str, str], placed: dict[str, tuple[str, str]], current: bool) -> bytes:
    """A private ollama confirms (or receives) each blob and creates the model; return /api/show's answer."""
    model = runtime["model"]
    server_ref: list = []
    try:
        with PrivateServer(runtime["ollama"], store) as server:
            server_ref.append(server)
            for digest, (path, how) in placed.items():
                status, _ = request(server.base, "HEAD", f"/api/blobs/sha256:{digest}")
                if status != 200:
                    size = os.path.getsize(path)
                    _check_space(store, size)
                    log(f"create: blob {how}; uploading {human_bytes(size)} of {os.path.basename(path)} to ollama (it keeps a copy)")
                    upload_blob(server.base, path, digest)
                elif not current:
                    log(f"create: blob {how} in {store}/blobs: no copy")
            body = dict(create_request(runtime), model=model, files={n: f"sha256:{d}" for n, d in files.items()})
            create_streamed(server.base, body, idle_timeout=_idle_timeout(placed))
            return request_show(server.base, model)[1]
    except StepError:
        _show_private_log(server_ref[0] if server_ref else PrivateServer(runtime["ollama"], store))
        raise


def _idle_timeout(placed: dict[str, tuple[str, str]]) -> float:
    """How long ollama may stay silent during create: 0.30+ copies the whole
    rewritten model under its digest without a word; allow 20 MB/s for it."""
    size = sum(os.path.getsize(path) for path, _ in placed.values())
    return max(600.0, size / 20e6)


def _new_model_bytes(store: str, digests: set[str], inputs: set[str]) -> int:
    """The size of the blobs the create wrote (in the manifest, not among its inputs)."""
    total = 0
    for digest in digests - inputs:
        try:
            total += os.stat(os.path.join(store, "blobs", f"sha256-{digest}")).st_size
        except OSError:
            pass
    return total
