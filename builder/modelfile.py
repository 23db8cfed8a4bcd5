"""Write an ollama Modelfile, quoting values exactly as ollama parses them.

ollama's parser (parser/parser.go, v0.5.7) takes a value as the rest of the
line, strips one pair of `"` or `\"\"\"` delimiters and interprets no escapes:
`\\n` stays two characters, and a `\"\"\"` ending a line closes a multi-line
value early. So a value is written inside `\"\"\"` (TEMPLATE, SYSTEM) or `"`
(stop) and anything those cannot carry is rejected when the config loads.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Iterable


def _control_character(text: str, allowed: str) -> str | None:
    for char in text:
        if char not in allowed and unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return f"U+{ord(char):04X}"
    return None


def check_modelfile_text(text: str) -> str | None:
    """Why `text` cannot be a TEMPLATE or SYSTEM value, or None if it can."""
    if '"""' in text:
        return 'contains """, which ends a Modelfile value early and cannot be escaped; rephrase without three quotes in a row'
    bad = _control_character(text, "\n\t")
    if bad:
        return f"contains the control character {bad}, which ollama's Modelfile parser drops; remove it"
    return None


def check_stop(stop: str) -> str | None:
    """Why `stop` cannot be a `PARAMETER stop` value, or None if it can."""
    if "\n" in stop or "\r" in stop:
        return "a Modelfile cannot carry a line break in a stop sequence (ollama reads no escapes); use a one-line stop"
    if stop.startswith('""'):
        return 'must not start with two quotes ("" opens a multi-line value in a Modelfile)'
    bad = _control_character(stop, "\t")
    if bad:
        return f"contains the control character {bad}, which ollama's Modelfile parser drops; remove it"
    return None


def format_parameter(value: Any) -> str:
    """A PARAMETER value as ollama's FormatParams reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def render_modelfile(
    from_path: str,
    parameters: Iterable[tuple[str, Any]],
    template: str | None,
    system: str | None,
    header: str,
) -> str:
    """The Modelfile text. Values must have passed the checks above."""
    lines = [f"# {header}", f"FROM {from_path}"]
    for name, value in parameters:
        if name == "num_gpu" and value == "auto":
            lines.append("# PARAMETER num_gpu: auto; the create step sets the number planned for the GPUs where it runs (BUILDER_NUM_GPU)")
        elif name == "stop":
            lines.extend(f'PARAMETER stop "{stop}"' for stop in value)
        else:
            lines.append(f"PARAMETER {name} {format_parameter(value)}")
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
