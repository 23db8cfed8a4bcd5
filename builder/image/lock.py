"""builder.lock: the sha256 of every downloaded artifact, trusted on first use.

The lock sits beside the config (`builder.yaml` -> `builder.lock`). It records
the canonical URL (before any mirror prefix) so a lock made behind one mirror
holds behind another.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import ConfigError, Problem
from builder.fsutil import write_atomic

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class LockEntry:
    url: str
    sha256: str
    size: int


def lock_path(config_path: str | Path) -> Path:
    return Path(config_path).with_suffix(".lock")


def read_lock(path: Path) -> dict[str, LockEntry]:
    """The entries of `path`; {} when there is none. A malformed lock is a config error."""
    if not path.exists():
        return {}

    def bad(why: str) -> ConfigError:
        return ConfigError(Problem("", f"{why}; fix it or delete it and run `builder lock`", None, str(path)))

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not a valid lock file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("artifacts"), dict):
        raise bad("not a builder lock (expected version 1 and artifacts)")
    entries = {}
    for key, entry in data["artifacts"].items():
        if (
            not isinstance(entry, dict)
            or set(entry) != {"url", "sha256", "size"}
            or not isinstance(entry["url"], str)
            or not isinstance(entry["sha256"], str)
            or not _HEX64.match(entry["sha256"])
            or not isinstance(entry["size"], int)
            or entry["size"] < 0
        ):
            raise bad(f"artifacts.{key} must have url, sha256 (64 lowercase hex) and size")
        entries[key] = LockEntry(entry["url"], entry["sha256"], entry["size"])
    return entries


def render_lock(entries: dict[str, LockEntry]) -> bytes:
    data = {
        "version": 1,
        "artifacts": {k: {"url": e.url, "sha256": e.sha256, "size": e.size} for k, e in sorted(entries.items())},
    }
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def write_lock(path: Path, entries: dict[str, LockEntry]) -> None:
    write_atomic(path, render_lock(entries))


def lock_digest(entries: dict[str, LockEntry]) -> str:
    """sha256 of the lock's content, for the image label."""
    return hashlib.sha256(render_lock(entries)).hexdigest()


def current_lock_digest(config_path: str | Path) -> str | None:
    """The digest of builder.lock beside the config, if there is one."""
    entries = read_lock(lock_path(config_path))
    return lock_digest(entries) if entries else None
