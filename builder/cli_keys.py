"""`builder keys`: show, add and revoke the API keys the endpoint asks for
(serve.auth: keys). The file and its rules: builder/supervisor/keys.py."""

from __future__ import annotations

from contextlib import contextmanager

import click

from builder.cli import TARGET_NAMES, _load, config_option
from builder.errors import ConfigError, Problem


@click.group()
def keys() -> None:
    """Show, add and revoke the API keys the endpoint asks for (serve.auth: keys)."""


target_option = click.option("--target", type=click.Choice(TARGET_NAMES),
                             help="The target whose keys (the host target keeps them in its prefix) [default: the config's].")


def _keys_file(config_path: str, target: str | None) -> str:
    from builder.targets.keys import keys_path

    config = _load(config_path)
    path = keys_path(config, target)
    if path is None:
        raise ConfigError(Problem("serve.auth", "is none: the endpoint asks for no key (set serve.auth: keys)", None, config.source))
    return path


@contextmanager
def _keys_errors(config_path: str):
    """The keys file's problems (mode, lines, a missing name) as one config error line."""
    from builder.supervisor.keys import KeysFileError

    try:
        yield
    except KeysFileError as exc:
        raise ConfigError(Problem("serve.keys_file", str(exc), None, config_path)) from None


@keys.command("list")
@config_option
@target_option
def keys_list(config_path: str, target: str | None) -> None:
    """The keys' names and roles (never the keys)."""
    from builder.supervisor.keys import list_keys

    path = _keys_file(config_path, target)
    with _keys_errors(config_path):
        found = list_keys(path)
    for name, admin in found:
        click.echo(f"{name}{'  admin' if admin else ''}")
    click.echo(f"({path})", err=True)


@keys.command("show")
@config_option
@target_option
@click.argument("name")
def keys_show(config_path: str, target: str | None, name: str) -> None:
    """Print the key named NAME."""
    from builder.supervisor.keys import read_entries

    path = _keys_file(config_path, target)
    with _keys_errors(config_path):
        found = [e.key for e in read_entries(path) if e.name == name]
    if not found:
        raise ConfigError(Problem("serve.keys_file", f"{path} has no key named {name} (`builder keys list` names them)", None, config_path))
    click.echo(found[0])


@keys.command("add")
@config_option
@target_option
@click.argument("name")
@click.option("--admin", is_flag=True, help="May also create, delete, copy, pull and push models and upload blobs.")
def keys_add(config_path: str, target: str | None, name: str, admin: bool) -> None:
    """Add a random key named NAME and print it."""
    from builder.supervisor.keys import add_key

    path = _keys_file(config_path, target)
    with _keys_errors(config_path):
        click.echo(add_key(path, name, admin=admin))


@keys.command("revoke")
@config_option
@target_option
@click.argument("name")
def keys_revoke(config_path: str, target: str | None, name: str) -> None:
    """Remove the key named NAME: refused from the next request on, nothing restarted."""
    from builder.supervisor.keys import revoke_key

    path = _keys_file(config_path, target)
    with _keys_errors(config_path):
        revoked = revoke_key(path, name)
    if not revoked:
        raise ConfigError(Problem("serve.keys_file", f"{path} has no key named {name} (`builder keys list` names them)", None, config_path))
    click.echo(f"revoked {name} in {path}", err=True)
