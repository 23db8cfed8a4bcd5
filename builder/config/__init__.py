"""Load builder.yaml into a Config: shape first (JSON Schema), then meaning.

Pure except for reading the config file itself and, for local storage with a
shard folder, listing that folder. Every problem names the file, the line and
the key path, and says what to do.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from builder.config.meaning import _resolve
from builder.config.shape import ENV_OVERRIDES, _apply_env, _check_shape, _Locator, _merge  # noqa: F401 - ENV_OVERRIDES is public
from builder.config.types import (  # noqa: F401 - the package's public types
    DEFAULT_CONFIG_NAME, DEFAULT_NFS_OPTIONS, RESERVED_ENV, Base, Config, Gpus, KubernetesSettings, Model,
    PlanSettings, Release, Serve, Shards, Storage,
)
from builder.config.yamlsource import load_yaml
from builder.errors import ConfigError, Problem

@lru_cache(maxsize=1)
def defaults() -> dict[str, Any]:
    text = resources.files("builder.config").joinpath("defaults.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve the config at `path`; raise ConfigError."""
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            Problem("", f"no such file; create one with `builder init --preset tiny -o {source}`", None, source)
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(Problem("", f"cannot read it: {exc}", None, source)) from None
    return parse_config(text, source, base_dir=file.resolve().parent, env=env)


def parse_config(
    text: str, source: str, base_dir: Path, env: Mapping[str, str] | None = None
) -> Config:
    """Validate config `text` (from `source`) in two passes and resolve it."""
    data, lines = load_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(Problem("", "must be a mapping of keys (version, model, storage, ...)", 1, source))
    locate = _Locator(source, lines)
    _apply_env(data, env if env is not None else os.environ, locate)
    _check_shape(data, locate)
    return _resolve(_merge(defaults(), data), locate, base_dir)


