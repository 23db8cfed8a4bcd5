"""Will ollama 0.5.7 accept this TEMPLATE? A check of the subset of Go's
text/template that ollama's templates use, before anything is merged: a
template Go's parser rejects makes `create` fail with HTTP 400 at deploy
time (template.Parse in ollama's template/template.go).

What is checked, as Go's parser does: every `{{` has its `}}` (with the trim
markers `{{- ` and ` -}}`), comments `{{/* */}}` close, quoted strings close,
`if`/`range`/`with` blocks end, `else` and `end` have a block to belong to,
and every function is one Go or ollama defines (text/template's builtins and
ollama's `json`). What is outside the subset (`define`, `template`, `block`,
fields ollama 0.5.7 does not pass) is a warning, not a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# text/template's builtins (funcs.go) and what ollama 0.5.7 adds (template.go: json).
FUNCTIONS = frozenset(
    "and call html index slice js len not or print printf println urlquery eq ge gt le lt ne json".split()
)
# The values ollama 0.5.7 passes (template.Values, api.Message, api.Tool and its parts).
FIELDS = frozenset(
    "System Prompt Response Suffix Messages Tools Role Content Images ToolCalls Function Name Arguments "
    "Type Description Parameters Required Properties Enum Items".split()
)
_KEYWORDS = ("if", "else", "end", "range", "with", "define", "template", "block", "break", "continue")


@dataclass(frozen=True)
class TemplateProblem:
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.message}"


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def check_template(text: str) -> tuple[TemplateProblem | None, list[TemplateProblem]]:
    """(the first error Go's parser would report, warnings)."""
    warnings: list[TemplateProblem] = []
    stack: list[tuple[str, int]] = []  # (keyword, offset)
    position = 0
    while True:
        start = text.find("{{", position)
        if start < 0:
            break
        body_start = start + 2
        if text.startswith("- ", body_start) or text.startswith("-\t", body_start) or text.startswith("-\n", body_start):
            body_start += 2
        elif text.startswith("-", body_start) and not text.startswith("-}}", body_start):
            line, column = _position(text, start)
            return TemplateProblem(line, column, "a trim marker must be followed by a space: write {{- not {{-x"), warnings
        if text.startswith("/*", body_start):
            close = text.find("*/", body_start + 2)
            if close < 0 or not re.match(r"\s*-?\}\}", text[close + 2:]):
                line, column = _position(text, start)
                return TemplateProblem(line, column, "unclosed comment"), warnings
            position = text.index("}}", close) + 2
            continue
        end, error = _action_end(text, body_start)
        if error:
            line, column = _position(text, start)
            return TemplateProblem(line, column, error), warnings
        body = text[body_start:end]
        if body.endswith(" -") or body.endswith("\t-") or body.endswith("\n-"):
            body = body[:-2]
        problem = _check_action(body.strip(), text, start, stack, warnings)
        if problem:
            return problem, warnings
        position = end + 2
    if stack:
        keyword, offset = stack[-1]
        line, column = _position(text, offset)
        return TemplateProblem(line, column, f"{{{{{keyword}}}}} is never closed: add {{{{end}}}}"), warnings
    return None, warnings


def _action_end(text: str, start: int) -> tuple[int, str | None]:
    """The offset of the `}}` closing an action, skipping quoted strings."""
    index = start
    while index < len(text):
        char = text[index]
        if char in "\"'`":
            close = text.find(char, index + 1) if char == "`" else _closing_quote(text, index)
            if close < 0 or (char != "`" and "\n" in text[index:close]):
                return -1, "unterminated quoted string"
            index = close + 1
            continue
        if text.startswith("}}", index):
            return index, None
        if text.startswith("{{", index):
            return -1, "unclosed action ({{ inside an action)"
        index += 1
    return -1, "unclosed action: a {{ has no }}"


def _closing_quote(text: str, start: int) -> int:
    quote = text[start]
    index = start + 1
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == quote:
            return index
        index += 1
    return -1


def _check_action(body: str, text: str, offset: int, stack: list[tuple[str, int]], warnings: list[TemplateProblem]) -> TemplateProblem | None:
    line, column = _position(text, offset)
    if not body:
        return TemplateProblem(line, column, "missing value for command (an empty {{ }})")
    words = re.findall(r'"(?:[^"\\]|\\.)*"|`[^`]*`|\S+', body)
    keyword = words[0]
    if keyword in ("if", "range", "with"):
        if len(words) == 1:
            return TemplateProblem(line, column, f"missing value for {keyword}")
        stack.append((keyword, offset))
    elif keyword == "else":
        if not stack or stack[-1][0] not in ("if", "range", "with"):
            return TemplateProblem(line, column, "unexpected {{else}}: no {{if}}, {{range}} or {{with}} is open")
        if len(words) > 1 and words[1] not in ("if", "with"):
            return TemplateProblem(line, column, f"unexpected {words[1]!r} after else")
    elif keyword == "end":
        if len(words) > 1:
            return TemplateProblem(line, column, "unexpected words after end")
        if not stack:
            return TemplateProblem(line, column, "unexpected {{end}}: no {{if}}, {{range}} or {{with}} is open")
        stack.pop()
    elif keyword in ("define", "template", "block"):
        warnings.append(TemplateProblem(line, column, f"{{{{{keyword}}}}} is outside what builder checks; ollama's own parser decides"))
        if keyword in ("define", "block"):
            stack.append((keyword, offset))
        return None
    elif keyword in ("break", "continue"):
        if not any(k == "range" for k, _ in stack):
            return TemplateProblem(line, column, f"{{{{{keyword}}}}} outside {{{{range}}}}")
    for word in words:
        if word[0] in "\"`'" or word in _KEYWORDS or word in (":=", "=", "|", "nil", "true", "false"):
            continue
        if re.fullmatch(r"[-+]?\d[\d._xXa-fA-F]*", word):
            continue
        name = word.strip("()")
        if not name:
            continue
        if name.startswith("$") or name.startswith("."):
            for field in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)", name):
                if field not in FIELDS:
                    warnings.append(TemplateProblem(line, column, f".{field} is not a field ollama 0.5.7 passes to templates (it will be empty)"))
            continue
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name not in FUNCTIONS:
            return TemplateProblem(line, column, f'function "{name}" not defined')
    return None
