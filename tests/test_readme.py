"""The README is the reference: every command, every option and every config
key the code accepts is in it, and it names nothing the code does not have."""

from __future__ import annotations

import re
from pathlib import Path

import click

from builder.cli import main
from builder.config.schema import OLLAMA_PARAMETERS, config_schema

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def leaf_keys(schema: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, sub in schema.get("properties", {}).items():
        key = prefix + name
        children = [s for s in [sub, *sub.get("oneOf", []), *sub.get("anyOf", [])] if s.get("properties")]
        if children:
            for child in children:
                keys += leaf_keys(child, key + ".")
        else:
            keys.append(key)
    return sorted(set(keys))


def documented_keys() -> set[str]:
    """The keys named in the first column of the config reference's table."""
    names: set[str] = set()
    for line in section("Config reference").splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([a-z0-9_.*]+)`", line.split("|")[1]))
    return names


def test_every_config_key_is_in_the_reference_and_nothing_else() -> None:
    documented = documented_keys()
    keys = [k for k in leaf_keys(config_schema()) if not k.startswith("model.parameters.")]
    assert [k for k in keys if k not in documented] == [], "config keys missing from README's Config reference"
    assert "model.parameters.*" in documented
    row = next(line for line in section("Config reference").splitlines() if line.startswith("| `model.parameters.*`"))
    assert [p for p in OLLAMA_PARAMETERS if f"`{p}`" not in row] == [], "parameters missing from the model.parameters.* row"
    stale = sorted(documented - set(keys) - {"model.parameters.*"})
    assert stale == [], "README's Config reference names keys the schema does not have"


def _commands(group: click.Group, prefix: str = "builder") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in sorted(group.commands.items()):
        found.append((f"{prefix} {name}", command))
        if isinstance(command, click.Group):
            found += _commands(command, f"{prefix} {name}")
    return found


def test_every_command_and_option_is_in_the_commands_table() -> None:
    rows = [line for line in section("Commands").splitlines() if line.startswith("| `builder")]
    missing = []
    for path, command in _commands(main):
        if isinstance(command, click.Group):
            continue
        *parents, name = path.split()
        row = next((r for r in rows if re.search(rf"`{' '.join(parents)} ([^`]*\|)?{re.escape(name)}[ `\\|]", r)), None)
        if row is None:
            missing.append(path)
            continue
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                if not any(opt in row for opt in param.opts if opt.startswith("--")) and not any(opt in row for opt in param.opts):
                    missing.append(f"{path} {param.opts[0]}")
    assert missing == [], f"README's Commands table lacks these: {missing}"
