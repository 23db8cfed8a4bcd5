"""`builder status` and what it reads: the model in /api/ps, the GPU
memory its runner holds, the supervisor's record of the load and the
create, the remembered read rates; and the lines a person reads."""

from __future__ import annotations

import json
import time
from pathlib import Path

from builder.config import Config
from builder.errors import BuilderError
from builder.render.blueprint import Blueprint
from builder.targets.common import endpoint_url, full_name, gpu_words, listed_models


def loaded_model(url: str, model: str, headers: dict[str, str] | None = None) -> dict | None:
    """The model's /api/ps entry (size, size_vram, expires_at) while it is loaded."""
    import httpx

    wanted = full_name(model)
    try:
        response = httpx.get(f"{url}/api/ps", timeout=10, trust_env=False, headers=headers or {})
        if response.status_code != 200:
            return None
        for entry in response.json().get("models", []):
            if isinstance(entry, dict) and wanted in (entry.get("name"), entry.get("model")):
                return {k: entry.get(k) for k in ("size", "size_vram", "expires_at")}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return None


def runner_gpu_memory(config: Config) -> int | None:
    """GPU memory that this stack's runners hold now, as nvidia-smi counts it
    per process (ollama's /api/ps size_vram is its estimate before the load,
    which can be far off: 8.6 GiB where the runner held 14.5 on an H100), or
    None when it is not known here (no nvidia-smi, no GPU, or a runner on
    another machine)."""
    if config.gpus.kind == "none":
        return None
    from builder.preflight import local_stores
    from builder.preflight.machine import own_gpu_use

    stores = local_stores(config)
    held = own_gpu_use(stores) if stores else {}
    return sum(held.values()) if held else None


def with_runner_memory(loaded: dict | None, config: Config) -> dict | None:
    """An /api/ps entry with `gpu_held` (runner_gpu_memory), `cpu_only` (gpus: none) and
    `vram_measured` (ollama 0.30+: size_vram is llama-server's buffers, not an estimate) added."""
    from builder.supervisor.common import CURRENT

    return loaded if loaded is None else dict(loaded, gpu_held=runner_gpu_memory(config), cpu_only=config.gpus.kind == "none",
                                              vram_measured=config.ollama_generation == CURRENT)


def status_lines(report: dict) -> list[str]:
    """`builder status` for a person: one line per thing."""
    from builder.supervisor.common import human_bytes

    current = f", stale: {report['image_stale']}" if report["image_stale"] else ""
    if report.get("target") == "host":
        out = [f"prefix    {report['prefix']} (no image: the host target runs without a container engine)"]
    else:
        out = [f"image     {report['image']} ({report['image_id'] or 'not built'}{current})"]
    for name, service in report["services"].items():
        state = service.get("state")
        extra = f", exit {service['exit_code']}" if state == "exited" else ""
        health = f", {service['health']}" if service.get("health") else ""
        out.append(f"{name:<9} {state}{extra}{health}")
    listed = {True: "listed", False: "not listed", None: "endpoint not answering"}[report["model_listed"]]
    out.append(f"endpoint  {report['endpoint']} ({report['model']}: {listed})")
    created = report.get("created")
    if created:
        uploaded = f"; {human_bytes(created['uploaded'])} uploaded (no hard link possible)" if created.get("uploaded") else ""
        if created.get("path") == "shards":
            out.append(f"created   from {created.get('inputs')} shard(s), no merge: ollama wrote {human_bytes(created.get('written') or 0)} (its rewrite into one blob){uploaded}")
        elif uploaded:
            out.append(f"created   from the merged file{uploaded}: ollama keeps that copy")
        else:
            out.append("created   the merged file hard-linked into ollama's store: no copy")
    loaded = report["loaded"]
    if loaded:
        share = f"{loaded['size_vram'] * 100 // loaded['size']}%" if loaded.get("size") else "0%"
        where = "on the CPU (gpus: none)" if loaded.get("cpu_only") else gpu_words(loaded.get("size_vram") or 0, share, loaded.get("gpu_held"), bool(loaded.get("vram_measured")))
        out.append(f"model     loaded: {human_bytes(loaded['size'] or 0)}, {where}, {until_words(loaded.get('expires_at'))}")
    elif report.get("load_failed"):
        out.append(f"model     not loaded: the supervisor's load failed: {report['load_failed']} (`builder logs` has the rest; "
                   "a request loads it again)")
    elif report["model_listed"]:
        out.append("model     not loaded (the first request, or the supervisor's warm-up, loads it)")
    out += [f"reads     {line.removeprefix('reads   ')}" for line in report_read_lines(report)]
    return out


def remember_rate(config: Config, rate) -> None:
    """Keep a read-rate measurement for plan and status, which only read
    (best effort: a download cache that cannot be written loses it)."""
    from builder.fsutil import write_atomic
    from builder.preflight.where import known_rates, rates_path

    path = rates_path(config)
    known = known_rates(path)
    known[str(Path(rate.path).resolve())] = {"mb_s": round(rate.mb_s, 1), "at": int(time.time())}
    try:
        write_atomic(path, (json.dumps(known, indent=2, sort_keys=True) + "\n").encode())
    except OSError:
        pass


def report_read_lines(report: dict) -> list[str]:
    """status's `reads` lines, from the report alone."""
    from builder.preflight.where import decimal_size, duration

    reads = report.get("reads")
    if not reads:
        return []
    size = decimal_size(reads["model_bytes"]) if reads.get("model_bytes") else "the model"
    took = f": {duration(reads['load_seconds'])} at {reads['mb_s']:g} MB/s" if "load_seconds" in reads else (
        f" at {reads['mb_s']:g} MB/s" if "mb_s" in reads else " (`builder doctor` measures the rate)")
    out = [f"reads   a load reads {size} from the {reads['place']} {reads['where']}{took}"]
    if reads.get("volume"):
        out.append(f"reads   the model volume ({reads['volume']['where']}) is read {reads['volume']['read']}")
    return out


def supervisor_record(probe) -> dict:
    """The supervisor's `health --loaded --json` through `probe`'s ask: the
    load's state (and error) and how the model was created; {} when unknown."""
    if probe is None:
        return {}
    try:
        _code, output = probe[0]()
        record = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
        return record if isinstance(record, dict) else {}
    except (ValueError, AttributeError, IndexError, OSError, BuilderError):
        return {}


def load_failed(record: dict) -> str | None:
    """The warm-up's error when its load failed (ollama may load the model later, on a request)."""
    return str(record.get("error") or "unknown cause") if record.get("state") == "failed" else None


def until_words(expires_at: str | None) -> str:
    """/api/ps's expires_at for a person: keep_alive -1 is a date centuries away."""
    if not expires_at:
        return "until unknown"
    try:
        year = int(str(expires_at)[:4])
    except ValueError:
        return f"until {expires_at}"
    return "kept loaded (keep_alive -1)" if year >= 2200 else f"until {expires_at}"


def status_report(blueprint: Blueprint, engine, lock_sha256: str | None, target: str, services: dict, probe=None) -> dict:
    """`builder status`'s report: the target's containers, the image and
    whether it is stale, the endpoint, how the model was created, whether it
    is listed and loaded."""
    from builder.image.build import image_staleness
    from builder.preflight.where import model_bytes_here, reads

    from builder.targets.keys import endpoint_headers

    url = endpoint_url(blueprint)
    headers = endpoint_headers(blueprint, target)
    record = supervisor_record(probe)
    names = listed_models(url, headers)
    listed = None if names is None else full_name(blueprint.config.model.name) in names
    return {
        "project": blueprint.config.project,
        "target": target,
        "image": blueprint.image,
        "image_id": engine.image_id(blueprint.image),
        "image_stale": image_staleness(blueprint, engine.image_labels(blueprint.image), lock_sha256) or None,
        "endpoint": url,
        "model": blueprint.config.model.name,
        "model_listed": listed,
        "loaded": with_runner_memory(loaded_model(url, blueprint.config.model.name, headers) if listed else None, blueprint.config),
        "created": record.get("create"),
        "load_failed": load_failed(record),
        "reads": reads(blueprint.config, model_bytes_here(blueprint.config)),
        "services": services,
    }
