"""Escape a value for the file it lands in, or refuse it.

Each function is a Jinja2 filter too (see render.py), so templates never
paste a raw value.
"""

from __future__ import annotations

import shlex

import json
from typing import Any

import yaml


class Unrepresentable(ValueError):
    """The value cannot be written safely in this language."""


def dockerfile_quote(value: Any) -> str:
    """A double-quoted Dockerfile ENV/LABEL value: `\\`, `"` and `$` escaped.

    A line break would end the instruction, so it is refused.
    """
    text = str(value)
    if "\n" in text or "\r" in text:
        raise Unrepresentable(f"a Dockerfile value cannot hold a line break: {text!r}")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _compose_escape(value: Any) -> Any:
    # Compose interpolates ${VAR} and $VAR in every string; $$ is a literal $.
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {_compose_escape(k): _compose_escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compose_escape(v) for v in value]
    return value


def compose_scalar(value: Any) -> str:
    """One scalar for a compose file: a JSON string or number, which YAML reads as is."""
    return json.dumps(_compose_escape(value), ensure_ascii=False)


def compose_block(value: Any, indent: int) -> str:
    """A mapping or list for a compose file, dumped by PyYAML and indented."""
    text = yaml.safe_dump(
        _compose_escape(value), default_flow_style=False, sort_keys=True, allow_unicode=True, width=1 << 16
    )
    pad = " " * indent
    return "\n".join(pad + line for line in text.rstrip("\n").split("\n"))


def sh(value) -> str:
    return shlex.quote(str(value))

def sh_join(argv: list[str]) -> str:
    """Quoted for the shell, one option (with its value) per line."""
    lines: list[list[str]] = []
    for index, arg in enumerate(argv):
        if index == 0 or (arg.startswith("-") and index > 2):
            lines.append([])
        lines[-1].append(shlex.quote(arg))
    return " \\\n  ".join(" ".join(line) for line in lines)
