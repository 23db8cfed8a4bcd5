"""Where the model's bytes live, and how long a load takes from there.

Every load reads the model from where ollama's store is: the model cache
(storage.model_cache, this machine's own disk) when one is set, else the
model volume (an NFS share, or a local folder). Without a cache every
restart, OOM kill or upgrade reads the whole model from the volume again;
with one, the volume is read once per machine (the merge) and never at a
load.

Read rates are measured by `builder doctor` (a few seconds each) and by `up`
(one second, of the volume, when no cache is set), and remembered (by
targets.status.remember_rate) in the download cache's read-rates.json, so that `plan` and `status`, which only
read, can say how long a load takes. serve.read_mb_s is never replaced by a
measurement: it sizes ollama's load timeout, which must not change with a
noisy reading; `up` says when the measured rate is below it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from builder.config import Config
from builder.preflight.readrate import ReadRate

RATES_FILE = "read-rates.json"
SLOW_LOAD_S = 300  # a full read from the volume longer than this: a model cache pays
FRESH_S = 24 * 3600  # up measures the volume again once its remembered rate is this old


@dataclass(frozen=True)
class Place:
    role: str  # "model cache" | "model volume"
    where: str  # a path on this machine, or server:export
    path: Path | None  # where this machine can read it, if it can


def volume(config: Config) -> Place:
    from builder.preflight.model import shard_folder

    storage = config.storage
    where = storage.path if storage.kind == "local" else f"NFS {storage.server}:{storage.export}"
    return Place("model volume", where, shard_folder(config))


def load_place(config: Config) -> Place:
    """Where every load reads the model from."""
    cache = config.storage.model_cache
    if cache:
        return Place("model cache", cache, Path(cache))
    return volume(config)


def rates_path(config: Config) -> Path:
    from builder.config.places import cache_root

    return cache_root(config) / RATES_FILE


def known_rates(path: Path) -> dict:
    """read-rates.json: {resolved path: {"mb_s": float, "at": unix time}} (empty when absent or unreadable)."""
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remembered(config: Config, place: Place) -> tuple[float, int] | None:
    """(MB/s, when) last measured for `place`, or None."""
    if place.path is None:
        return None
    entry = known_rates(rates_path(config)).get(str(place.path.resolve()))
    if not isinstance(entry, dict) or not isinstance(entry.get("mb_s"), (int, float)) or entry["mb_s"] <= 0:
        return None
    return float(entry["mb_s"]), int(entry.get("at", 0))


def decimal_size(size: int) -> str:
    """Sizes beside MB/s rates, in the same (decimal) units."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < 10 * scale else f"{size / scale:.0f} {unit}"
    return f"{size} B"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def reads(config: Config, model_bytes: int | None) -> dict:
    """Where loads read the model from, and how long a load takes at the remembered rate (plan's and status's JSON)."""
    place = load_place(config)
    known = remembered(config, place)
    out: dict = {"place": place.role, "where": place.where, "model_bytes": model_bytes}
    if known:
        out["mb_s"], out["measured_at"] = known
        if model_bytes:
            out["load_seconds"] = round(model_bytes / (known[0] * 1e6))
    if config.storage.model_cache:
        out["volume"] = {"where": volume(config).where, "read": "once per machine, by the merge (ollama 0.30+: by create)"}
    return out


def read_lines(config: Config, model_bytes: int | None) -> list[str]:
    """One or two lines: where loads read the model from, how long that takes, and the volume's part."""
    info = reads(config, model_bytes)
    size = decimal_size(model_bytes) if model_bytes else "the model"
    if "mb_s" in info:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["measured_at"]))
        took = f": {duration(info['load_seconds'])} at {info['mb_s']:g} MB/s (measured {when})" if "load_seconds" in info else \
            f" at {info['mb_s']:g} MB/s (measured {when})"
    else:
        took = " (read rate not measured here: `builder doctor` measures it)"
    if config.storage.model_cache:
        return [f"reads   every load reads {size} from the model cache {info['where']}{took}",
                f"reads   the model volume ({info['volume']['where']}) is read once per machine; restarts read nothing from it"]
    advice = "; storage.model_cache keeps it on this machine's disk" if config.storage.kind == "nfs" or info.get("load_seconds", 0) > SLOW_LOAD_S else ""
    return [f"reads   every load reads {size} from the model volume {info['where']}{took}{advice}"]


def slow_volume_warning(config: Config, model_bytes: int, seconds: float = 1.0) -> tuple[str | None, ReadRate | None]:
    """`up` without a model cache: the volume's read rate, measured for a
    second unless a measurement under FRESH_S old is remembered (each
    measurement reads the share; the caller remembers a new one); a warning
    when every load would read it for more than SLOW_LOAD_S, or when it
    reads slower than serve.read_mb_s assumes."""
    from builder.preflight.readrate import load_seconds, measure

    place = volume(config)
    if config.storage.model_cache or place.path is None or not place.path.is_dir():
        return None, None
    known = remembered(config, place)
    fresh = known is not None and time.time() - known[1] < FRESH_S
    if fresh:
        assert known is not None
        rate, new = ReadRate(place.path, int(known[0] * 1e6), 1.0, "model volume"), None
    else:
        try:
            rate = new = measure(place.path, seconds=seconds, limit=256 << 20, what="model volume")
        except OSError:
            return None, None
        if rate.bytes < (16 << 20):
            return None, None  # too little to mean anything (a tiny model)
    took = load_seconds(model_bytes, rate)
    notes = []
    if took > SLOW_LOAD_S:
        notes.append(f"every load (each restart, OOM kill or upgrade) reads the {decimal_size(model_bytes)} model from the model volume "
                     f"{place.where} at {rate.mb_s:.0f} MB/s: {duration(took)}; set storage.model_cache to a folder on this machine's "
                     "local disk (README: Model cache) and restarts read nothing from the volume")
    if rate.mb_s < config.serve.read_mb_s and config.serve.load_timeout is None and took > max(300, model_bytes / (config.serve.read_mb_s * 1e6)):
        notes.append(f"the model volume reads at {rate.mb_s:.0f} MB/s, below serve.read_mb_s ({config.serve.read_mb_s:g}), which sizes ollama's "
                     f"load timeout: set serve.read_mb_s: {max(1, int(rate.mb_s))}")
    return "; ".join(notes) or None, new


def model_bytes_here(config: Config) -> int | None:
    """The shards' size on disk, where this machine can see them."""
    from builder.preflight.model import shard_folder, shard_names

    folder = shard_folder(config)
    if folder is None:
        return None
    try:
        return sum(os.stat(folder / name).st_size for name in shard_names(config))
    except OSError:
        return None
