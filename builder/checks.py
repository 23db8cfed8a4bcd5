"""Checks of the world outside the config file (the meaning pass's file part)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from builder.config import Config
from builder.errors import ConfigError, Problem
from builder.supervisor.shards import shard_file_names


def check_local_shards(config: Config) -> None:
    """On local storage, every shard must be present; NFS cannot be seen from here."""
    if config.storage.kind != "local":
        return
    shards = config.model.shards
    folder = Path(config.storage.path) / shards.folder
    names = shard_file_names(shards.prefix, shards.count) if shards.count else [PurePosixPath(shards.first).name]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError(
            Problem(
                "model.shards",
                f"{len(missing)} of {len(names)} shard(s) missing in {folder}: {listed}; copy them there and run again",
                None,
                config.source,
            )
        )
