"""Where builder keeps its own files on this machine."""

from __future__ import annotations

import os
from pathlib import Path

from builder.config.types import Config


def cache_root(config: Config | None = None) -> Path:
    """Where downloads and scratch files live: $BUILDER_CACHE_DIR, the config's
    cache_dir, else ~/.cache/builder."""
    if os.environ.get("BUILDER_CACHE_DIR"):
        return Path(os.environ["BUILDER_CACHE_DIR"])
    if config is not None and config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "builder"
