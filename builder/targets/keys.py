"""The API keys on the machine that runs `builder` (serve.auth: keys).

The keys file is the gate's (builder/supervisor/keys.py has its format and
rules: mode 0600, one named key a line, `admin` on the keys that may change
the store). `up` makes one key, named default, the first time, and says
where it is without printing it; `builder keys` shows, adds and revokes keys.
builder's own calls to the endpoint (is the model listed, loaded) carry the
first key of the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from builder.errors import ConfigError, Problem
from builder.render.blueprint import Blueprint, keys_file


def keys_path(config, target: str | None = None) -> str | None:
    """The keys file `target` (default: the config's) uses, or None with serve.auth: none."""
    if config.serve.auth != "keys":
        return None
    if (target or config.target) == "host" and not config.serve.keys_file:
        from builder.targets.host import _prefix

        return keys_file(config, str(_prefix(config.project, config)))
    return keys_file(config)


def ensure_keys(blueprint: Blueprint, target: str, echo: Callable[[str], None]) -> None:
    """Make the keys file with one key when there is none; check the one
    there is (its mode, its lines, who can read it). For containers the file
    belongs to the containers' user, which reads it through a bind mount."""
    from builder.supervisor.keys import KeysFileError, add_key, read_entries

    path = keys_path(blueprint.config, target)
    if path is None:
        return
    config = blueprint.config
    container = target != "host"
    if not os.path.exists(path):
        if container and os.geteuid() not in (0, config.uid):
            raise ConfigError(Problem(
                "serve.keys_file", f"the containers run as uid {config.uid} and must own {path} (mode 0600), which uid "
                f"{os.geteuid()} cannot arrange: run `builder up` as root or as uid {config.uid}, or set image.uid to {os.geteuid()}",
                None, config.source))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        add_key(path, "default")
        if container and os.geteuid() == 0:
            os.chown(path, config.uid, config.gid)
        echo(f"keys: made an API key named default in {path} (mode 0600); `builder keys show default` prints it, "
             "and every request needs it as Authorization: Bearer KEY")
    try:
        entries = read_entries(path)
    except KeysFileError as exc:
        raise ConfigError(Problem("serve.keys_file", str(exc), None, config.source)) from None
    if not entries:
        raise ConfigError(Problem("serve.keys_file", f"{path} holds no key: add one with `builder keys add NAME`", None, config.source))
    owner = os.stat(path).st_uid
    if container and owner != config.uid:
        raise ConfigError(Problem(
            "serve.keys_file",
            f"{path} belongs to uid {owner}, but the containers run as {config.uid} and must read it (mode 0600): "
            f"chown {config.uid} {path} (or set image.uid)", None, config.source))


def endpoint_headers(blueprint: Blueprint, target: str) -> dict[str, str]:
    """What builder's own requests to the endpoint send: the first key, when
    the endpoint asks for one."""
    from builder.supervisor.keys import KeysFileError, read_entries

    path = keys_path(blueprint.config, target)
    if path is None:
        return {}
    try:
        entries = read_entries(path)
    except (KeysFileError, OSError):
        return {}
    return {"Authorization": f"Bearer {entries[0].key}"} if entries else {}
