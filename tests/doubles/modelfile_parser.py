"""A DOUBLE of ollama's Modelfile parser (parser/parser.go, v0.5.7), for tests.

Rules it follows from that source: a command's value is the rest of the line;
one pair of `\"\"\"` or `"` delimiters is stripped and nothing is unescaped; a
quoted value may span lines and closes at the first line whose trimmed text
ends with the closing delimiter; `#` starts a comment only at a line's start.
"""

from __future__ import annotations


def _unquote(text: str) -> tuple[str, bool]:
    if text.startswith('"""'):
        if len(text) >= 6 and text.endswith('"""'):
            return text[3:-3], True
        return "", False
    if text.startswith('"'):
        if len(text) >= 2 and text.endswith('"'):
            return text[1:-1], True
        return "", False
    return text, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Commands as (name, value); PARAMETER values come as 'name value'."""
    commands: list[tuple[str, str]] = []
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.lower()
        if keyword == "parameter":
            name, _, rest = rest.lstrip().partition(" ")
        buffer = rest
        value, ok = _unquote(buffer.strip())
        while not ok:
            if index >= len(lines):
                raise ValueError("unexpected EOF")
            buffer += "\n" + lines[index]
            index += 1
            value, ok = _unquote(buffer.strip())
        if keyword == "parameter":
            commands.append(("parameter", f"{name} {value}"))
        else:
            commands.append((keyword, value))
    return commands
