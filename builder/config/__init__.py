"""Load builder.yaml into a Config: shape first (JSON Schema), then meaning.

Pure except for reading the config file itself and, for local storage with a
shard folder, listing that folder. Every problem names the file, the line and
the key path, and says what to do.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
import string
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml

from builder.errors import ConfigError, Problem
from builder.modelfile import check_modelfile_text, check_stop
from builder.config.schema import config_schema
from builder.supervisor.shards import merged_file_name, parse_shard_name, shard_file_name
from builder.config.yamlsource import Path as KeyPath
from builder.config.yamlsource import key_path, load_yaml

DEFAULT_CONFIG_NAME = "builder.yaml"
DEFAULT_NFS_OPTIONS = "rw,nfsvers=4.1,hard"

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

# Set by builder itself inside the containers; a user value would break the stack.
RESERVED_ENV = {
    "OLLAMA_HOST": "set serve.port and serve.bind instead",
    "OLLAMA_MODELS": "it follows storage",
    "PATH": "the image needs its own",
    "PYTHONPATH": "the supervisor needs its own",
    "LD_LIBRARY_PATH": "the supervisor sets it for each program",
    "BUILDER_RUNTIME": "the supervisor reads it",
    "BUILDER_SERVE": "it carries serve.keep_alive, load_timeout and parallel",
}
_GO_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")

_NEAR_SHARD = re.compile(r"-[0-9]+-of-[0-9]+\.gguf$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")
_DIGEST_REF = re.compile(r"^(?P<name>[a-z0-9]+([._/:-][a-z0-9]+)*)@sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Release:
    """A release archive: its version (or build), where it comes from, its digest."""

    version: str
    url: str
    sha256: str | None
    binaries: tuple[str, ...] = ()  # llama.cpp only: the programs to stage


@dataclass(frozen=True)
class Base:
    """The image's base: `ref` (pinned by digest) or a bootstrap from a mirror."""

    ref: str | None
    distro: str | None = None
    suite: str | None = None
    mirror: str | None = None
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Shards:
    """The model's shard set, relative to the model storage."""

    folder: str  # "" for the storage root
    prefix: str
    count: int  # 0: a single, unsplit .gguf file

    @property
    def first(self) -> str:
        name = shard_file_name(self.prefix, 1, self.count) if self.count else merged_file_name(self.prefix)
        return str(PurePosixPath(self.folder, name)) if self.folder else name


@dataclass(frozen=True)
class Model:
    name: str
    shards: Shards
    merged: str
    parameters: tuple[tuple[str, Any], ...]
    template: str | None
    system: str | None
    merge_tool: str = "builder"


@dataclass(frozen=True)
class Storage:
    """NFS (server, export, options) or a local host folder (path)."""

    kind: str  # "nfs" | "local"
    server: str = ""
    export: str = ""
    options: str = ""
    path: str = ""


@dataclass(frozen=True)
class Gpus:
    kind: str  # "all" | "none" | "count" | "ids"
    count: int = 0
    ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanSettings:
    """For num_gpu: auto and `builder plan`: the GPUs' memory and where the shards can be read."""

    gpu_memory_gib: tuple[float, ...]
    margin_gib: float
    shards_dir: str | None


@dataclass(frozen=True)
class KubernetesSettings:
    namespace: str | None
    storage_class: str | None
    storage_size: str
    replicas: int


@dataclass(frozen=True)
class Serve:
    port: int
    bind: str
    env: tuple[tuple[str, str], ...]
    ready_timeout: int = 1800
    keep_alive: str = "-1"
    load_timeout: int | None = None  # None: auto
    read_mb_s: float = 200
    parallel: int | None = None  # None: auto
    single_sequence_above_gib: float = 16

    def limits(self) -> dict:
        """The rule the supervisor sizes ollama by (BUILDER_SERVE; builder.supervisor.limits)."""
        return {
            "keep_alive": self.keep_alive,
            "load_timeout": {"read_mb_s": self.read_mb_s, "seconds": self.load_timeout},
            "parallel": {"single_above_gib": self.single_sequence_above_gib, "value": self.parallel},
        }


@dataclass(frozen=True)
class Config:
    """A validated config. `source` is the file it came from."""

    version: int
    project: str
    image_name: str
    image_tag: str
    uid: int
    gid: int
    source_date_epoch: int
    base: Base
    ollama: Release
    llama_cpp: Release
    github_mirror: str
    registry_mirror: str
    model: Model
    storage: Storage
    gpus: Gpus
    serve: Serve
    plan: PlanSettings
    kubernetes: KubernetesSettings
    cache_dir: str | None
    source: str

    @property
    def image(self) -> str:
        return f"{self.image_name}:{self.image_tag}"

    def digest(self) -> str:
        """sha256 of what in the config shapes the image: not where the model
        lies, which GPUs serve it or on which port, so the same config gives
        the same image on every machine."""
        data = asdict(self)
        for host_only in (
            "source", "cache_dir", "storage", "gpus", "serve", "project", "plan", "kubernetes", "github_mirror", "registry_mirror",
        ):
            data.pop(host_only)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()


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


def _template_fields(template: str) -> set[str] | None:
    """The {placeholders} of a URL template; None when its braces do not pair up."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError:
        return None


def _resolve(data: dict[str, Any], locate: _Locator, base_dir: Path) -> Config:
    problems: list[Problem] = []

    def fail(path: KeyPath, message: str) -> None:
        problems.append(locate.problem(path, message))

    project = data["project"]
    image = data["image"]
    mirrors = data["mirrors"]

    base_data = image["base"]
    if "ref" in base_data:
        ref = base_data["ref"]
        if not _DIGEST_REF.match(ref):
            fail(("image", "base", "ref"), "must be pinned by digest (NAME@sha256:<64 hex>) so the build is reproducible")
        base = Base(ref=ref)
    else:
        boot = {"distro": "debian", "suite": "bookworm", "packages": [], **base_data["bootstrap"]}
        base = Base(
            ref=None,
            distro=boot["distro"],
            suite=boot["suite"],
            mirror=mirrors[boot["distro"]],
            packages=tuple(sorted(set(boot["packages"]))),
        )

    releases = {}
    for key, field in (("ollama", "version"), ("llama_cpp", "build")):
        section = data[key]
        fields = _template_fields(section["url"])
        unknown = {"{"} if fields is None else fields - {field}
        if fields is None:
            fail((key, "url"), f"has an unpaired {{ or }}; write {{{field}}} where the {field} goes")
            url = section["url"]
        elif unknown:
            fail((key, "url"), f"unknown placeholder {{{sorted(unknown)[0]}}}; only {{{field}}} is replaced")
            url = section["url"]
        else:
            url = section["url"].replace("{" + field + "}", section[field])
        releases[key] = Release(section[field], url, section["sha256"], tuple(section.get("binaries", ())))

    model = _resolve_model(data["model"], data["storage"], base_dir, fail)
    storage = _resolve_storage(data["storage"], base_dir, fail)
    gpus = _resolve_gpus(data["gpus"])
    serve = _resolve_serve(data["serve"], fail)

    if problems:
        raise ConfigError(problems)
    assert model is not None and storage is not None
    return Config(
        version=data["version"],
        project=project,
        image_name=image["name"] or f"builder-{project}",
        image_tag=image["tag"],
        uid=image["uid"],
        gid=image["gid"],
        source_date_epoch=image["source_date_epoch"],
        base=base,
        ollama=releases["ollama"],
        llama_cpp=releases["llama_cpp"],
        github_mirror=mirrors["github"],
        registry_mirror=mirrors["registry"],
        model=model,
        storage=storage,
        gpus=gpus,
        serve=serve,
        plan=PlanSettings(
            tuple(float(v) for v in data["plan"].get("gpu_memory_gib", ())),
            float(data["plan"]["margin_gib"]),
            os.path.normpath(str(base_dir / Path(data["plan"]["shards_dir"]).expanduser())) if data["plan"].get("shards_dir") else None,
        ),
        kubernetes=KubernetesSettings(
            data["kubernetes"].get("namespace"),
            data["kubernetes"].get("storage_class"),
            data["kubernetes"]["storage_size"],
            data["kubernetes"]["replicas"],
        ),
        cache_dir=os.path.normpath(str(base_dir / Path(data["cache_dir"]).expanduser())) if data["cache_dir"] else None,
        source=locate.source,
    )


def _check_relative(path: KeyPath, value: str, fail: Any) -> bool:
    if value.startswith("/"):
        fail(path, "must be relative to the model storage (no leading /)")
        return False
    parts = value.split("/")
    if ".." in parts:
        fail(path, "must stay inside the model storage (no ..)")
        return False
    if not _SAFE_PATH.match(value.rstrip("/")):
        fail(path, "may hold only letters, digits and . _ + - / (rename the file or folder)")
        return False
    return True


def _resolve_model(model: dict[str, Any], storage: dict[str, Any], base_dir: Path, fail: Any) -> Model | None:
    ok = True
    shards_value = model["shards"]
    shards: Shards | None = None
    if _check_relative(("model", "shards"), shards_value, fail):
        shards = _resolve_shards(shards_value, storage, base_dir, fail)
    ok = shards is not None

    merged = None
    if shards is not None:
        expected_name = merged_file_name(shards.prefix)
        default_merged = str(PurePosixPath(shards.folder, expected_name)) if shards.folder else expected_name
        merged = default_merged
        if "merged" in model and shards.count == 0:
            if model["merged"] != shards.first:
                fail(("model", "merged"), "an unsplit model is served from its own file; leave model.merged out")
                ok = False
        elif "merged" in model and _check_relative(("model", "merged"), model["merged"], fail):
            given = PurePosixPath(model["merged"])
            if given.name != expected_name:
                fail(
                    ("model", "merged"),
                    f"'{given.name}' disagrees with the shards '{PurePosixPath(shards.first).name}'; "
                    f"name it '{expected_name}' or leave the key out",
                )
                ok = False
            merged = str(given)
        elif "merged" in model:
            ok = False

    parameters = []
    for name in sorted(model["parameters"]):
        value = model["parameters"][name]
        if name == "stop":
            stops = [value] if isinstance(value, str) else list(value)
            for index, stop in enumerate(stops):
                reason = check_stop(stop)
                if reason:
                    fail(("model", "parameters", "stop") + ((index,) if not isinstance(value, str) else ()), reason)
                    ok = False
            value = tuple(stops)
        parameters.append((name, value))

    texts = {}
    for key in ("template", "system"):
        text = model.get(key)
        if text is not None:
            reason = check_modelfile_text(text)
            if reason:
                fail(("model", key), reason)
                ok = False
        texts[key] = text

    if not ok or shards is None or merged is None:
        return None
    return Model(
        model["name"], shards, merged, tuple(parameters), texts["template"], texts["system"], model.get("merge_tool", "builder")
    )


def _resolve_shards(value: str, storage: dict[str, Any], base_dir: Path, fail: Any) -> Shards | None:
    path = PurePosixPath(value)
    folder = "" if str(path.parent) == "." else str(path.parent)
    if value.endswith(".gguf"):
        parsed = parse_shard_name(path.name)
        if parsed is None:
            if _NEAR_SHARD.search(path.name):
                fail(("model", "shards"), f"'{path.name}' looks like a shard but shard names have five digits: NAME-00001-of-0000N.gguf")
                return None
            return Shards(folder, path.name[: -len(".gguf")], 0)
        if parsed.count < 1 or not 1 <= parsed.number <= parsed.count:
            fail(("model", "shards"), f"'{path.name}' has an impossible shard number; expected NAME-00001-of-0000N.gguf")
            return None
        if parsed.number != 1:
            first = shard_file_name(parsed.prefix, 1, parsed.count)
            fail(("model", "shards"), f"names shard {parsed.number} of {parsed.count}; name the first shard '{first}'")
            return None
        return Shards(folder, parsed.prefix, parsed.count)
    # A folder: find its first shard (only possible where the storage is local).
    folder = value.rstrip("/")
    if "local" not in storage:
        fail(
            ("model", "shards"),
            "is a folder, which builder cannot list on NFS storage; name the first shard: FOLDER/NAME-00001-of-0000N.gguf",
        )
        return None
    root = Path(storage["local"])
    directory = (root if root.is_absolute() else base_dir / root) / folder
    try:
        candidates = sorted(p.name for p in directory.iterdir() if (parse_shard_name(p.name) or _NOT).number == 1)
    except OSError:
        fail(("model", "shards"), f"folder {directory} cannot be read; name the first shard instead (NAME-00001-of-0000N.gguf)")
        return None
    if len(candidates) != 1:
        found = "no first shard" if not candidates else f"several first shards ({', '.join(candidates)})"
        fail(("model", "shards"), f"folder {directory} has {found}; name the first shard instead")
        return None
    parsed = parse_shard_name(candidates[0])
    assert parsed is not None
    return Shards(folder, parsed.prefix, parsed.count)


class _NotShard:
    number = 0


_NOT = _NotShard()


def _resolve_storage(storage: dict[str, Any], base_dir: Path, fail: Any) -> Storage | None:
    if "nfs" in storage:
        nfs = storage["nfs"]
        try:
            server = str(ipaddress.ip_address(nfs["server"]))
        except ValueError:
            fail(
                ("storage", "nfs", "server"),
                f"'{nfs['server']}' is not an IP address; Docker's NFS volume driver needs the server's IP, not a host name",
            )
            return None
        options = nfs.get("options", DEFAULT_NFS_OPTIONS)
        if any(opt.split("=", 1)[0] == "addr" for opt in options.split(",")):
            fail(("storage", "nfs", "options"), "must not set addr=; builder sets it from storage.nfs.server")
            return None
        export = nfs["export"]
        if len(export) > 1:
            export = export.rstrip("/")
        return Storage("nfs", server=server, export=export, options=options)
    local = Path(storage["local"]).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    return Storage("local", path=os.path.normpath(str(local)))


def _resolve_gpus(value: Any) -> Gpus:
    if value in ("all", "none"):
        return Gpus(value)
    if isinstance(value, int):
        return Gpus("count", count=value)
    return Gpus("ids", ids=tuple(str(v) for v in value))


def _resolve_serve(serve: dict[str, Any], fail: Any) -> Serve:
    try:
        bind = str(ipaddress.ip_address(serve["bind"]))
    except ValueError:
        fail(("serve", "bind"), f"'{serve['bind']}' is not an IP address (127.0.0.1 keeps the API on this machine)")
        bind = serve["bind"]
    env = []
    for name in sorted(serve["env"], key=str):
        value = serve["env"][name]
        if not isinstance(name, str):
            fail(("serve", "env", str(name)), "is not an environment variable name: use A-Z, 0-9 and _ only")
            continue
        if name in RESERVED_ENV:
            fail(("serve", "env", name), f"is set by builder ({RESERVED_ENV[name]}); remove it")
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if "\n" in text or "\r" in text or "\0" in text:
            fail(("serve", "env", name), "must be one line (no newline or NUL characters)")
            continue
        env.append((name, text))
    keep_alive = serve["keep_alive"]
    if isinstance(keep_alive, str) and not _GO_DURATION.match(keep_alive.strip()):
        fail(("serve", "keep_alive"), f"'{keep_alive}' is not a duration: use -1 (forever), a number of seconds, or a duration such as 30m")
    load_timeout = None if serve["load_timeout"] == "auto" else serve["load_timeout"]
    parallel = None if serve["parallel"] == "auto" else serve["parallel"]
    return Serve(
        serve["port"], bind, tuple(env), serve["ready_timeout"], str(keep_alive).strip(), load_timeout,
        serve["read_mb_s"], parallel, serve["single_sequence_above_gib"],
    )
