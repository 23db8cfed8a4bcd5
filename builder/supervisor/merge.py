"""The `merge` role: check every shard, join them with llama-gguf-split into a
temporary file, verify it, then rename it into place. With ollama 0.30 and
later (runtime.json's ollama_generation), which creates from the shards
themselves, it only checks them (headers and lengths) and writes nothing.

Facts it is built on (llama.cpp b4610): `--merge` refuses an existing output,
leaves a 0-byte or truncated output when it fails or is killed, and accepts a
truncated later shard (exit 0, corrupt output). So: the output is a temporary
name beside the target, every shard is checked against its own header first,
the result is checked again, and only then renamed. A record of what was
merged lets the next run skip in well under a second.
"""

from __future__ import annotations

import glob
import os
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass

from .common import (
    LEGACY,
    Progress,
    is_current,
    StepError,
    file_lock,
    fsync_dir,
    human_bytes,
    io_counters,
    log,
    read_json,
    sha256_of,
    write_json_atomic,
)
from .gguf import GGUFError, GGUFHeader, check_file, read_header_file
from .loadable import NotLoadable, check_loadable
from .join import join
from .shards import shard_file_names

RECORD_SUFFIX = ".merge.json"
TEMP_MARK = ".merging-"
FREE_SPACE_MARGIN = 64 << 20


@dataclass(frozen=True)
class ShardState:
    name: str
    size: int
    mtime_ns: int


def record_path(merged: str) -> str:
    return merged + RECORD_SUFFIX


def temp_path(merged: str) -> str:
    """Unique even across hosts sharing the NFS export (every container is PID 1)."""
    folder, name = os.path.split(merged)
    return os.path.join(folder, f".{name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def merge_lock(merged: str):
    """Two containers, or two hosts (pods of one Deployment), never merge into
    the same file at once: a POSIX lock beside it, which works over NFSv4."""
    folder, name = os.path.split(merged)
    return file_lock(os.path.join(folder, f".{name}.lock"), f"merge: another merge of {merged} is running; waiting for it")


def remove_leftovers(merged: str) -> list[str]:
    """Delete temporary outputs of earlier, killed runs (never the user's files)."""
    folder, name = os.path.split(merged)
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}{TEMP_MARK}*")):
        os.unlink(path)
        removed.append(os.path.basename(path))
    return removed


def shard_states(folder: str, names: list[str]) -> list[ShardState]:
    states = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise StepError(f"merge: shard {path} is missing; copy it there (all {len(names)} shards are needed)") from None
        except PermissionError:
            raise StepError(f"merge: shard {path} cannot be read (permission denied); check the export's permissions") from None
        states.append(ShardState(name, info.st_size, info.st_mtime_ns))
    return states


def _record(states: list[ShardState], merged: str, header: GGUFHeader, sha256: str) -> dict:
    info = os.stat(merged)
    return {
        "shards": [{"name": s.name, "size": s.size, "mtime_ns": s.mtime_ns} for s in states],
        "merged": {"name": os.path.basename(merged), "size": info.st_size, "mtime_ns": info.st_mtime_ns},
        "sha256": sha256,
        "tensors": header.tensor_count,
    }


def merged_digest(merged: str) -> str:
    """The merged file's sha256: from the merge record when it still describes
    the file, else read once and remembered (an unsplit model, a hand merge)."""
    record = read_json(record_path(merged)) or {}
    info = os.stat(merged)
    identity = {"name": os.path.basename(merged), "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    if record.get("merged") == identity and isinstance(record.get("sha256"), str):
        return record["sha256"]
    digest = sha256_of(merged, "hashing")
    record.update(merged=identity, sha256=digest)
    write_json_atomic(record_path(merged), record)
    return digest


def up_to_date(states: list[ShardState], merged: str) -> bool:
    """True when the record matches the shards and the merged file as they are now."""
    record = read_json(record_path(merged))
    if not record:
        return False
    try:
        info = os.stat(merged)
    except FileNotFoundError:
        return False
    expected = {"name": os.path.basename(merged), "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    shards = [{"name": s.name, "size": s.size, "mtime_ns": s.mtime_ns} for s in states]
    return record.get("shards") == shards and record.get("merged") == expected


def check_shards(folder: str, states: list[ShardState], count: int) -> tuple[list[GGUFHeader], int]:
    """Every shard parses, is whole, and belongs to this split; return the headers and the tensor total."""
    headers: list[GGUFHeader] = []
    total = 0
    for index, state in enumerate(states):
        path = os.path.join(folder, state.name)
        try:
            header = check_file(path, state.size)
        except GGUFError as exc:
            raise StepError(f"merge: shard {path} {exc}; copy it again from the source") from None
        except OSError as exc:
            raise StepError(f"merge: shard {path} cannot be read: {exc.strerror}") from None
        if header.split_no != index or header.split_count != count:
            raise StepError(
                f"merge: shard {path} says it is part {_part(header)}, expected part {index + 1} of {count}; "
                "it belongs to another split model"
            )
        headers.append(header)
        total += header.tensor_count
    declared = headers[0].metadata.get("split.tensors.count")
    if declared is not None and declared != total:
        raise StepError(
            f"merge: the shards in {folder} hold {total} tensors but shard 1 declares {declared}; "
            "a shard belongs to another model"
        )
    return headers, total


def preflight(files: list[tuple[str, GGUFHeader]], runtime: dict) -> None:
    """Refuse, before anything is written, a model ollama cannot load."""
    try:
        check_loadable(files, runtime.get("ollama_generation", LEGACY))
    except NotLoadable as exc:
        raise StepError(f"merge: {exc}") from None


def _part(header: GGUFHeader) -> str:
    if header.split_count is None:
        return "of no split (an unsplit file)"
    return f"{(header.split_no or 0) + 1} of {header.split_count}"


def check_space(folder: str, needed: int, reclaimable: int = 0) -> None:
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize + reclaimable
    if free < needed + FREE_SPACE_MARGIN:
        raise StepError(
            f"merge: {folder} has {human_bytes(free)} free, the merged file needs {human_bytes(needed)}; free some space"
        )


def verify_merged(path: str, tensors: int) -> GGUFHeader:
    try:
        header = check_file(path, os.path.getsize(path))
    except GGUFError as exc:
        raise StepError(f"merge: the merged file {path} {exc}") from None
    if header.tensor_count != tensors:
        raise StepError(f"merge: the merged file {path} holds {header.tensor_count} tensors, the shards {tensors}")
    return header


def cut_trailing_padding(path: str) -> int:
    """Cut the zeros llama-gguf-split writes after the last tensor: ollama
    0.5.7's create fails on bytes there ("invalid file magic"; see join.py).
    Returns the bytes cut; bytes that are not zeros are refused, not cut."""
    header = read_header_file(path)
    size = os.path.getsize(path)
    extra = size - header.expected_size
    if extra <= 0:
        return 0
    with open(path, "rb") as handle:
        handle.seek(header.expected_size)
        tail = handle.read(extra + 1)
    if extra > header.alignment or tail.strip(b"\0"):
        raise StepError(f"merge: {path} has {extra} bytes after its last tensor that are not padding; "
                        "ollama cannot create a model from it: delete it and run the merge again")
    os.truncate(path, header.expected_size)
    log(f"merge: cut {extra} bytes of padding after the last tensor of {path} (ollama 0.5.7's create refuses them)")
    return extra


def run_gguf_split(binary: str, first: str, out: str, total: int) -> None:
    """Run `llama-gguf-split --merge`, showing progress from the output's growth.
    If the supervisor is stopped meanwhile, the tool is killed too."""
    try:
        process = subprocess.Popen([binary, "--merge", first, out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise StepError(f"merge: cannot run {binary}: {exc.strerror}; rebuild the image with `builder build`") from None
    progress = Progress("merging", total)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            try:
                progress.update(os.path.getsize(out))
            except OSError:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        output = process.stdout.read().decode("utf-8", "replace") if process.stdout else ""
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        done.set()
        watcher.join()
    seconds = progress.finish()
    if code != 0:
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
        raise StepError(f"merge: llama-gguf-split failed (exit {code}): {tail}")
    log(f"merge: joined {human_bytes(total)} in {seconds:.1f} s")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def merge(runtime: dict) -> int:
    """Run the merge role; raise StepError on failure."""
    shards = runtime["shards"]
    first = shards["first"]
    merged = runtime["merged"]
    folder = os.path.dirname(first)
    if not os.path.isdir(folder):
        raise StepError(f"merge: the folder {folder} does not exist on the model storage; put the shards there")
    count = shards["count"]
    if count == 0:  # one unsplit file: nothing to join, only to check
        try:
            header = check_file(first, _size(first))
        except GGUFError as exc:
            raise StepError(f"merge: {first} {exc}") from None
        preflight([(first, header)], runtime)
        log(f"merge: {first} is a single whole GGUF file; nothing to merge")
        return 0
    names = shard_file_names(shards["prefix"], count)
    states = shard_states(folder, names)
    if not is_current(runtime) and up_to_date(states, merged):
        log(f"merge: {merged} is up to date with its {count} shards; nothing to do")
        return 0
    # Every check that can fail on the user's shards comes before anything is written.
    headers, tensors = check_shards(folder, states, count)
    preflight([(os.path.join(folder, s.name), h) for s, h in zip(states, headers)], runtime)
    if is_current(runtime):
        # ollama 0.30+ takes the shards as they are: its create writes the one merged blob.
        log(f"merge: {count} shards checked ({human_bytes(sum(s.size for s in states))}, {tensors} tensors); "
            "this ollama reads split models, so nothing is merged")
        if os.path.isfile(merged):
            log(f"merge: {merged} (from an ollama 0.5 setup) is not used any more; delete it to free {human_bytes(os.path.getsize(merged))}")
        if glob.glob(os.path.join(glob.escape(os.path.dirname(merged)), f".{glob.escape(os.path.basename(merged))}{TEMP_MARK}*")):
            with merge_lock(merged):  # a killed 0.5 merge's temporary file: up to the model's size
                for leftover in remove_leftovers(merged):
                    log(f"merge: removed {leftover}, left by a run that was stopped")
        return 0
    os.makedirs(os.path.dirname(merged), exist_ok=True)
    # Before anything is written (even the lock file): is there room, counting
    # what the leftovers of a killed run would give back?
    leftovers = glob.glob(os.path.join(glob.escape(os.path.dirname(merged)), f".{glob.escape(os.path.basename(merged))}{TEMP_MARK}*"))
    check_space(os.path.dirname(merged), sum(s.size for s in states), sum(os.path.getsize(p) for p in leftovers))
    with merge_lock(merged):
        return _merge_locked(runtime, states, headers, tensors)


def _merge_locked(runtime: dict, states: list[ShardState], headers: list[GGUFHeader], tensors: int) -> int:
    first = runtime["shards"]["first"]
    count = runtime["shards"]["count"]
    merged = runtime["merged"]
    target_folder = os.path.dirname(merged)
    for leftover in remove_leftovers(merged):
        log(f"merge: removed {leftover}, left by a run that was stopped")
    if up_to_date(states, merged):  # another container finished it while we waited
        log(f"merge: {merged} is up to date with its {count} shards; nothing to do")
        return 0
    data = sum(s.size for s in states)
    if os.path.exists(merged) and read_json(record_path(merged)) is None:
        # A merged file without our record (merged by hand, say): adopt it when
        # it is whole, holds every tensor and is newer than every shard;
        # merging 150 GB again would waste an hour.
        try:
            existing = verify_merged(merged, tensors)
            newer = os.stat(merged).st_mtime_ns >= max(s.mtime_ns for s in states)
            if newer and existing.split_count in (None, 0):  # llama-gguf-split's output keeps split.count 0
                cut_trailing_padding(merged)
                digest = sha256_of(merged, "hashing")
                write_json_atomic(record_path(merged), _record(states, merged, existing, digest))
                log(f"merge: {merged} already holds all {tensors} tensors; recorded it")
                return 0
        except StepError as exc:
            log(f"{exc}; merging again")
    check_space(target_folder, data)
    out = temp_path(merged)
    _unlink(out)
    tool = runtime.get("merge_tool", "builder")
    log(f"merge: joining {count} shards ({human_bytes(data)}) into {merged} with {tool}")
    before = io_counters()
    try:
        if tool == "llama-gguf-split":
            run_gguf_split(runtime["gguf_split"], first, out, data)
            cut_trailing_padding(out)
            digest = sha256_of(out, "hashing")  # one more read: this tool cannot hash as it writes
        else:
            digest = _join(runtime, states, headers, out, data)
        result = verify_merged(out, tensors)
        with open(out, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(out, merged)
        fsync_dir(target_folder)
    except BaseException:
        _unlink(out)
        raise
    write_json_atomic(record_path(merged), _record(states, merged, result, digest))
    after = io_counters()
    log(f"merge: wrote {merged} ({human_bytes(_size(merged))}, {tensors} tensors, sha256 {digest[:12]}...)")
    log(f"merge: io read {after[0] - before[0]} written {after[1] - before[1]} bytes")
    return 0


def _join(runtime: dict, states: list[ShardState], headers: list[GGUFHeader], out: str, total: int) -> str:
    folder = os.path.dirname(runtime["shards"]["first"])
    progress = Progress("merging", total)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb", buffering=0) as handle:
        try:
            digest, _written = join([os.path.join(folder, s.name) for s in states], headers, handle, progress.update)
        except ValueError as exc:
            raise StepError(f"merge: {exc}") from None
        except OSError as exc:
            raise StepError(f"merge: writing {out} failed: {exc.strerror}; check the free space and the storage") from None
    seconds = progress.finish()
    log(f"merge: joined {human_bytes(total)} in {seconds:.1f} s")
    return digest


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        raise StepError(f"merge: {path} is missing; copy it there") from None
