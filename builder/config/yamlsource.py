"""Read YAML while remembering the line of every key, and refuse duplicates.

PyYAML silently keeps the last of two equal keys; a config that says a thing
twice is an error here, reported with both lines.
"""

from __future__ import annotations

from typing import Any

import yaml

from builder.errors import ConfigError, Problem

Path = tuple[str | int, ...]


def key_path(path: Path) -> str:
    """`("model", "parameters", "stop", 0)` -> `model.parameters.stop[0]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_yaml(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse `text`; return the data and a map from key path to 1-based line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        reason = exc.problem or exc.context or "malformed YAML"
        raise ConfigError(Problem("", f"not valid YAML: {reason}; fix the syntax at this line", line, source)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(Problem("", f"not valid YAML: {exc}", None, source)) from None
    except RecursionError:
        raise ConfigError(Problem("", "not valid YAML for builder: an anchor refers to itself", None, source)) from None
    lines: dict[Path, int] = {}
    problems: list[Problem] = []
    if node is not None:
        try:
            _walk(node, (), lines, problems, source)
        except RecursionError:
            raise ConfigError(Problem("", "not valid YAML for builder: an anchor refers to itself", None, source)) from None
    if problems:
        raise ConfigError(problems)
    return data, lines


def _walk(node: yaml.Node, path: Path, lines: dict[Path, int], problems: list[Problem], source: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    Problem(key_path(path + (key,)), f"given twice (first at line {seen[key]}); keep one", line, source)
                )
            seen[key] = line
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, problems, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), lines, problems, source)
