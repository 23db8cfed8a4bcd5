"""create for ollama 0.30 and later: from the shards themselves, no merge.

ollama 0.30+ (v0.32.15 server/create.go) takes every shard's blob in
`POST /api/create`'s `files`, groups them by their split names and rewrites
them into one new blob (llama-quantize COPY into `blobs/COPY*`, then a copy
under its digest by manifest.NewLayer: twice the model in blobs/ at the
peak), leaving its inputs in blobs/. It also sets the times of every input
blob (manifest/layer.go touchLayer), which only the file's owner may do; a
hard-linked blob is the shard itself.

So: each shard is hashed once (remembered by path, size, mtime and inode),
hard-linked into blobs/ under its digest where its times may be set (else
uploaded: a copy), and after the create, whether it worked or not, the links
and copies no manifest references are removed and the shards' new times
recorded, so the next run reads nothing again. ollama's own temporary files
from a create that was killed are removed before the next one starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from .common import Progress, StepError, human_bytes, log, place_blob, read_json, sha256_of, shard_paths, write_json_atomic

SHARD_DIGESTS = ".builder-shards.json"
COPY_MARK = ".builder-copy-"  # a shard being copied in from another disk (killed: removed at the next create)
COPY_CHUNK = 8 << 20
MARGIN = 64 << 20
# ollama's os.CreateTemp/MkdirTemp names in blobs/ (create.go, manifest/layer.go): never a blob.
_OLLAMA_TEMP = re.compile(r"^(COPY.*|split-gguf-.*|split-copy.*|projector-metadata.*|sha256-(?![0-9a-f]{64}$).*)$")


def create_request(runtime: dict) -> dict:
    """What create POSTs besides the model and its files: runtime.json's
    request, with num_gpu: auto replaced by $BUILDER_NUM_GPU, the number
    `builder up` planned for the GPUs where this runs (the image says auto)."""
    request = json.loads(json.dumps(runtime.get("create", {})))
    parameters = request.get("parameters") or {}
    if parameters.get("num_gpu") == "auto":
        value = os.environ.get("BUILDER_NUM_GPU", "")
        if not value.isdigit():
            raise StepError("create: num_gpu is auto in this image and BUILDER_NUM_GPU is "
                            + (f"{value!r}, not a number" if value else "not set")
                            + ": `builder up` sets it from the plan for the GPUs here (`builder plan` shows it); "
                            "set it to a number of layers, or set model.parameters.num_gpu")
        parameters["num_gpu"] = int(value)
    return request


def request_digest(runtime: dict) -> str:
    return hashlib.sha256(json.dumps(create_request(runtime), sort_keys=True).encode()).hexdigest()


def shard_identity(runtime: dict) -> dict:
    """What a create from the shards depends on: every shard as it is now."""
    states = []
    for path in shard_paths(runtime):
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise StepError(f"create: shard {path} is missing; copy it there (all of them are needed)") from None
        states.append({"path": path, "size": info.st_size, "mtime_ns": info.st_mtime_ns})
    return {"shards": states, "model": runtime["model"], "request_sha256": request_digest(runtime)}


def _key(info: os.stat_result) -> dict:
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": [info.st_dev, info.st_ino]}


def known_digest(path: str, store: str) -> str | None:
    """The shard's sha256 as last read, if the shard has not changed since."""
    entry = (read_json(os.path.join(store, SHARD_DIGESTS)) or {}).get(path)
    key = _key(os.stat(path))
    if isinstance(entry, dict) and {k: entry.get(k) for k in key} == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    return None


def _remember_digest(store: str, path: str, key: dict, digest: str) -> None:
    record_file = os.path.join(store, SHARD_DIGESTS)
    known = read_json(record_file) or {}
    known[path] = dict(key, sha256=digest)
    write_json_atomic(record_file, known)


def elsewhere(path: str, store: str) -> bool:
    """A shard on another file system than the store (the model volume, with
    a model cache): no hard link can reach it."""
    return os.stat(path).st_dev != os.stat(os.path.join(store, "blobs")).st_dev


def copy_into_store(path: str, store: str) -> str:
    """A shard no link can reach, copied into blobs/ under its digest, hashed
    as it is read: one read of the model volume, no upload through ollama.
    Returns the digest."""
    blobs = os.path.join(store, "blobs")
    key = _key(os.stat(path))
    temp = os.path.join(blobs, f"{COPY_MARK}{os.getpid()}-{os.path.basename(path)}")
    progress = Progress(f"copying {os.path.basename(path)}", key["size"])
    digest = hashlib.sha256()
    done = 0
    try:
        with open(path, "rb", buffering=0) as source, open(temp, "wb", buffering=0) as target:
            while chunk := source.read(COPY_CHUNK):
                digest.update(chunk)
                target.write(chunk)
                done += len(chunk)
                progress.update(done)
            os.fsync(target.fileno())
        if _key(os.stat(path)) != key:
            raise StepError(f"create: shard {path} changed while it was read; wait until it is copied whole and run again")
        os.replace(temp, os.path.join(blobs, f"sha256-{digest.hexdigest()}"))
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    progress.finish()
    _remember_digest(store, path, key, digest.hexdigest())
    return digest.hexdigest()


def shard_digests(paths: list[str], store: str) -> list[str]:
    """Each shard's sha256, read only when the shard changed since it was last hashed."""
    record_file = os.path.join(store, SHARD_DIGESTS)
    known = read_json(record_file) or {}
    digests = []
    for path in paths:
        key = _key(os.stat(path))
        entry = known.get(path)
        if isinstance(entry, dict) and {k: entry.get(k) for k in key} == key and isinstance(entry.get("sha256"), str):
            digests.append(entry["sha256"])
            continue
        digest = sha256_of(path, f"hashing {os.path.basename(path)}")
        if _key(os.stat(path)) != key:
            raise StepError(f"create: shard {path} changed while it was read; wait until it is copied whole and run again")
        known[path] = dict(key, sha256=digest)
        write_json_atomic(record_file, known)
        digests.append(digest)
    return digests


def remember_new_times(store: str, paths: list[str]) -> None:
    """ollama set the shards' times through their links: the same files (inode
    and size), so their digests still hold under the new mtime."""
    record_file = os.path.join(store, SHARD_DIGESTS)
    known = read_json(record_file) or {}
    changed = False
    for path in paths:
        entry = known.get(path)
        try:
            key = _key(os.stat(path))
        except OSError:
            continue
        if isinstance(entry, dict) and entry.get("inode") == key["inode"] and entry.get("size") == key["size"] and entry.get("mtime_ns") != key["mtime_ns"]:
            entry["mtime_ns"] = key["mtime_ns"]
            changed = True
    if changed:
        write_json_atomic(record_file, known)


def may_set_times(path: str) -> bool:
    """Whether this process may set `path`'s times, as ollama will through the
    link (the owner or a privileged user; not root on a root_squash export)."""
    info = os.stat(path)
    try:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # the same times: only ctime changes
        return True
    except OSError:  # not the owner, or a read-only mount
        return False


def why_not_link(path: str) -> str | None:
    """A shard whose times this process may not set cannot be linked: ollama
    will set them through the link, and fail."""
    if may_set_times(path):
        return None
    return (f"owned by uid {os.stat(path).st_uid}, and this ollama sets its input blobs' times; "
            f"chown it to uid {os.geteuid()} to avoid the copy")


def remove_ollama_temporaries(store: str) -> None:
    """What a killed create of ollama 0.30+ left in blobs/ (its temporary
    names; pruning, which would remove them, is off here). Called under the
    create lock, so no create of ours is running."""
    blobs = os.path.join(store, "blobs")
    freed = 0
    for name in sorted(os.listdir(blobs)) if os.path.isdir(blobs) else []:
        if not _OLLAMA_TEMP.match(name) and not name.startswith(COPY_MARK):
            continue
        path = os.path.join(blobs, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)  # hard links to the shards: frees nothing
        else:
            freed += os.lstat(path).st_size
            os.unlink(path)
    if freed:
        log(f"create: removed {human_bytes(freed)} of temporary files a stopped create of ollama left in {blobs}")


def check_space(store: str, model: int, uploads: int) -> None:
    """Before ollama starts writing: the uploads (shards that could not be
    linked) and twice the model (its rewrite and the copy under its digest)."""
    stats = os.statvfs(store)
    free = stats.f_bavail * stats.f_frsize
    need = 2 * model + uploads
    if free < need + MARGIN:
        upload = f" and {human_bytes(uploads)} of uploads" if uploads else ""
        raise StepError(
            f"create: this ollama writes the model ({human_bytes(model)}) into {store}/blobs twice before it deletes "
            f"one copy{upload}: {human_bytes(need)} needed, {human_bytes(free)} free; free some space, "
            "or use ollama.version 0.5.7 (its merge writes one copy, its create none)"
        )


def place_shards(runtime: dict, store: str, identity: dict, placed: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Every shard in blobs/ under its digest: {file name: digest}; `placed`
    gets {digest: (path, how)} as each is placed, for the cleanup even when
    this fails half-way."""
    paths = [s["path"] for s in identity["shards"]]
    total = sum(s["size"] for s in identity["shards"])
    log(f"create: registering {runtime['model']} from {len(paths)} shard(s) ({human_bytes(total)}); ollama merges them as it creates")
    os.makedirs(os.path.join(store, "blobs"), exist_ok=True)
    # Shards on another disk (a model cache): copied in as they are hashed, one read each.
    far = [p for p in paths if elsewhere(p, store)]
    copies = [p for p in far if not _present(p, store)]
    if copies:
        check_space(store, total, sum(os.path.getsize(p) for p in copies))
    digests = shard_digests([p for p in paths if p not in far], store)
    near = dict(zip([p for p in paths if p not in far], digests))
    for path in paths:
        if path in far:
            digest = known_digest(path, store) if path not in copies else copy_into_store(path, store)
            how = "copied from the model volume" if path in copies else "present"
        else:
            digest = near[path]
            how = place_blob(path, store, digest, why_not_link)
        assert digest is not None
        placed[digest] = (path, how)
        log(f"create: {os.path.basename(path)} (sha256 {digest[:12]}...) {how} in {store}/blobs")
    uploads = sum(os.path.getsize(p) for p, how in placed.values() if how not in ("linked", "present") and not how.startswith("copied"))
    check_space(store, total, uploads)
    return {os.path.basename(p): d for p, d in ((p, next(d for d, (q, _) in placed.items() if q == p)) for p in paths)}


def _present(path: str, store: str) -> bool:
    """A far shard already in blobs/ under the digest last read for it (a create that failed after copying)."""
    digest = known_digest(path, store)
    blob = os.path.join(store, "blobs", f"sha256-{digest}")
    return digest is not None and os.path.isfile(blob) and os.path.getsize(blob) == os.path.getsize(path)
