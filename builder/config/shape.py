"""The shape pass: environment overrides, then JSON Schema, with every
error naming the file (or variable), the line and the key path."""

import copy
import difflib
import json
import math
import re
from functools import lru_cache
from typing import Any, Mapping


from builder.errors import ConfigError, Problem
from builder.config.schema import config_schema
from builder.config.yamlsource import Path as KeyPath
from builder.config.yamlsource import key_path

# Environment variables that override config keys (documented in the README).
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "BUILDER_PROJECT": ("project",),
    "BUILDER_IMAGE_NAME": ("image", "name"),
    "BUILDER_IMAGE_TAG": ("image", "tag"),
    "BUILDER_MIRROR_GITHUB": ("mirrors", "github"),
    "BUILDER_MIRROR_REGISTRY": ("mirrors", "registry"),
    "BUILDER_MIRROR_DEBIAN": ("mirrors", "debian"),
    "BUILDER_MIRROR_UBUNTU": ("mirrors", "ubuntu"),
    "BUILDER_SERVE_PORT": ("serve", "port"),
    "BUILDER_SERVE_BIND": ("serve", "bind"),
}
_INT_OVERRIDES = {"BUILDER_SERVE_PORT"}

# Keys whose value is one choice among alternatives: a user's value replaces
# the default instead of being merged into it.
_REPLACE_WHOLE = {("image", "base"), ("storage",)}


class _Locator:
    """Turns a key path into a Problem naming the file (or env var) and line."""

    def __init__(self, source: str, lines: dict[KeyPath, int]):
        self.source = source
        self.lines = lines
        self.env_sources: dict[KeyPath, str] = {}

    def problem(self, path: KeyPath, message: str) -> Problem:
        for depth in range(len(path), -1, -1):
            prefix = tuple(path[:depth])
            if prefix in self.env_sources:
                return Problem(key_path(path), message, None, f"${self.env_sources[prefix]}")
        line = None
        for depth in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:depth]))
            if line is not None:
                break
        return Problem(key_path(path), message, line, self.source)


def _apply_env(data: dict[str, Any], env: Mapping[str, str], locate: _Locator) -> None:
    for var, path in ENV_OVERRIDES.items():
        if var not in env:
            continue
        value: Any = env[var]
        if var in _INT_OVERRIDES:
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(Problem(key_path(path), f"must be a whole number, got {value!r}", None, f"${var}")) from None
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        locate.env_sources[path] = var


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"a whole number ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


_TYPE_WORDS = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def _check_shape(data: dict[str, Any], locate: _Locator) -> None:
    if not data:
        raise ConfigError(locate.problem((), "is empty; start from a preset: `builder init --preset tiny`"))
    schema = config_schema()
    problems: dict[str, Problem] = {}
    for path, value in _walk_values(data, ()):
        if isinstance(value, float) and not math.isfinite(value):
            problems[key_path(path)] = locate.problem(path, f"must be a finite number, got {value}")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 63:
            problems[key_path(path)] = locate.problem(path, "is too large (beyond a 64-bit integer)")
    if problems:
        raise ConfigError(sorted(problems.values(), key=lambda p: (p.line or 0, p.key)))
    errors = list(_validator_class()(schema).iter_errors(data))
    for error in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        for problem in _explain(error, locate):
            problems.setdefault(str(problem), problem)
    # An unknown key that is a misspelt required one says it all: drop "missing".
    misspelt = {p.message.split("'")[1] for p in problems.values() if "did you mean" in p.message}
    kept = [p for p in problems.values() if not (p.message.startswith("missing required key") and p.message.split("'")[1] in misspelt)]
    if kept:
        raise ConfigError(sorted(kept, key=lambda p: (p.line or 0, p.key)))


def _walk_values(node: Any, path: KeyPath):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk_values(value, path + (str(key),))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk_values(value, path + (index,))
    else:
        yield path, node


@lru_cache(maxsize=1)
def _validator_class():
    """Draft 2020-12, except that 2048.0 is not a whole number: YAML users
    mean what they type, and ollama rejects `num_ctx 2048.0`."""
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return validators.extend(Draft202012Validator, type_checker=checker)


def _explain(error: Any, locate: _Locator) -> list[Problem]:
    """Word one JSON Schema error for a person, naming the key and its line."""

    path: KeyPath = tuple(error.absolute_path)
    value = error.instance
    kind = error.validator
    schema = error.schema
    if "propertyNames" in error.schema_path:
        return [locate.problem(path + (value,), "is not an environment variable name: use A-Z, 0-9 and _ only")]
    if kind == "additionalProperties":
        allowed = sorted((schema.get("properties") or {}).keys())
        out = []
        for key in sorted((str(k) for k in set(value) - set(allowed))):
            hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            advice = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(allowed)}"
            out.append(locate.problem(path + (key,), f"unknown key; {advice}"))
        return out
    if kind == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        name = missing[0] if missing else error.message
        return [locate.problem(path, f"missing required key '{name}'")]
    if kind == "oneOf":
        choices = [next(iter(o["properties"])) for o in schema["oneOf"] if o.get("type") == "object" and o.get("required")]
        if choices and isinstance(value, dict):
            given = sorted(set(value) & set(choices))
            if len(given) != 1:
                found = f" (found {', '.join(given)})" if given else ""
                return [locate.problem(path, f"give exactly one of {', '.join(choices)}{found}")]
            # One choice made: what is wrong is inside it.
            branch = next(o for o in schema["oneOf"] if given[0] in o.get("properties", {}))
            inner = list(_validator_class()(branch).iter_errors(value))
            for sub in inner:
                sub.path.extendleft(reversed(path))
            return [p for sub in inner for p in _explain(sub, locate)]
        # When the value's type fits exactly one branch, that branch's error says most.
        fitting = [o for o in schema["oneOf"] if _type_fits(o, value)]
        if len(fitting) == 1:
            inner = list(_validator_class()(fitting[0]).iter_errors(value))
            if inner:
                for sub in inner:
                    sub.path.extendleft(reversed(path))
                return [p for sub in inner for p in _explain(sub, locate)]
    if kind in ("type", "oneOf", "const", "enum"):
        expected = _expected(schema)
        hint = ""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "string" in expected:
            hint = f'; quote it: "{value}"'
        return [locate.problem(path, f"expected {expected}, got {_describe(value)}{hint}")]
    if kind in ("minimum", "maximum"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and high is not None:
            return [locate.problem(path, f"must be between {low} and {high}, got {value}")]
        if low is not None:
            return [locate.problem(path, f"must be at least {low}, got {value}")]
        return [locate.problem(path, f"must be at most {high}, got {value}")]
    if kind == "pattern":
        expect = schema.get("x-expect") or schema.get("description", "a valid value")
        return [locate.problem(path, f"{_describe(value)} is not valid here: expected {expect}")]
    if kind in ("minLength", "minItems"):
        return [locate.problem(path, "must not be empty")]
    if kind == "uniqueItems":
        return [locate.problem(path, "lists the same item twice")]
    return [locate.problem(path, error.message)]


def _type_fits(schema: dict[str, Any], value: Any) -> bool:
    if "const" in schema or "enum" in schema:
        return False
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
        "null": lambda v: v is None,
    }
    return any(checks[k](value) for k in kinds if k in checks)


def _expected(schema: dict[str, Any]) -> str:
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " or ".join(json.dumps(v) for v in schema["enum"])
    if "oneOf" in schema:
        return " or ".join(_expected(o) for o in schema["oneOf"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(_TYPE_WORDS.get(k, k) for k in kind)
    return _TYPE_WORDS.get(kind, "a valid value") if kind else "a valid value"


def _merge(default: Any, given: Any, path: tuple[str, ...] = ()) -> Any:
    if isinstance(default, dict) and isinstance(given, dict) and path not in _REPLACE_WHOLE:
        out = copy.deepcopy(default)
        for key, value in given.items():
            out[key] = _merge(default.get(key), value, path + (key,)) if key in default else copy.deepcopy(value)
        return out
    return copy.deepcopy(given)
