"""The meaning pass: from a config of the right shape to a Config, checking
what a schema cannot (names, paths, values ollama's Modelfile can carry, IP
addresses, reserved variables)."""

import ipaddress
import os
import re
import string
from pathlib import Path, PurePosixPath
from typing import Any


from builder.errors import ConfigError, Problem
from builder.modelfile import check_modelfile_text, check_stop
from builder.supervisor.shards import merged_file_name, parse_shard_name, shard_file_name
from builder.config.yamlsource import Path as KeyPath
from builder.config.gotemplate import check_template
from builder.config.releases import SUPPORTED, default_url, generation
from builder.config.shape import _Locator
from builder.config.types import (
    DEFAULT_NFS_OPTIONS, RESERVED_ENV, Base, Config, Gpus, KubernetesSettings, Model, PlanSettings, Release, Serve, Shards, Storage,
)

_GO_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")

_NEAR_SHARD = re.compile(r"-[0-9]+-of-[0-9]+\.gguf$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")
_DIGEST_REF = re.compile(r"^(?P<name>[a-z0-9]+([._/:-][a-z0-9]+)*)@sha256:[0-9a-f]{64}$")



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
    ollama_version = data["ollama"]["version"]
    if generation(ollama_version) is None:
        fail(("ollama", "version"), f"{ollama_version} is not supported; builder supports {SUPPORTED}")
    for key, field in (("ollama", "version"), ("llama_cpp", "build")):
        section = dict(data[key])
        if section["url"] is None:  # ollama only: the release's own asset, by generation
            section["url"] = default_url(section[field])
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
    serve = _resolve_serve(data["serve"], base_dir, fail)
    planned_for = data["plan"].get("gpu_memory_gib") or ()
    wanted = gpus.count if gpus.kind == "count" else len(gpus.ids) if gpus.kind == "ids" else None
    if planned_for and wanted is not None and len(planned_for) != wanted:
        fail(("plan", "gpu_memory_gib"), f"lists {len(planned_for)} GPU(s) but gpus asks for {wanted}: num_gpu is planned for the GPUs serve gets; make them agree")

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
            float(data["plan"]["ram_gib"]) if data["plan"].get("ram_gib") else None,
        ),
        kubernetes=KubernetesSettings(
            data["kubernetes"].get("namespace"),
            data["kubernetes"].get("storage_class"),
            data["kubernetes"]["storage_size"],
            data["kubernetes"]["replicas"],
            data["kubernetes"].get("gpu_product"),
            str(data["kubernetes"]["cpu_limit"]),
            data["kubernetes"]["memory_limit"],
            tuple(data["kubernetes"]["allow_from_namespaces"]),
        ),
        cache_dir=os.path.normpath(str(base_dir / Path(data["cache_dir"]).expanduser())) if data["cache_dir"] else None,
        source=locate.source,
        target=data["target"],
        host_prefix=os.path.normpath(str(base_dir / Path(data["host"]["prefix"]).expanduser())) if data["host"].get("prefix") else None,
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
            elif key == "template":
                problem, _warnings = check_template(text)
                if problem:
                    fail(("model", key), f"{problem}; ollama 0.5.7's Go template parser would refuse it at create")
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
        return Storage("nfs", server=server, export=export, options=options, model_cache=_model_cache(storage, None, base_dir, fail))
    local = Path(storage["local"]).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    path = os.path.normpath(str(local))
    return Storage("local", path=path, model_cache=_model_cache(storage, path, base_dir, fail))


def _model_cache(storage: dict[str, Any], local: str | None, base_dir: Path, fail: Any) -> str | None:
    """storage.model_cache as an absolute path: never the model storage, or a folder in or above it."""
    if "model_cache" not in storage:
        return None
    cache = Path(storage["model_cache"]).expanduser()
    path = os.path.normpath(str(cache if cache.is_absolute() else base_dir / cache))
    if local is not None and (path == local or path.startswith(local.rstrip("/") + "/") or local.startswith(path.rstrip("/") + "/")):
        fail(("storage", "model_cache"), f"{path} is {'the model storage' if path == local else 'inside or above the model storage'} "
             f"({local}); give a folder on this machine's own disk beside it, e.g. /var/cache/builder")
        return None
    return path


def _resolve_gpus(value: Any) -> Gpus:
    if value in ("all", "none"):
        return Gpus(value)
    if isinstance(value, int):
        return Gpus("count", count=value)
    return Gpus("ids", ids=tuple(str(v) for v in value))


def _resolve_serve(serve: dict[str, Any], base_dir: Path, fail: Any) -> Serve:
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
    try:
        loopback = ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = False
    auth = serve["auth"]
    if auth == "auto":
        auth = "none" if loopback else "keys"
    elif auth == "none" and not loopback:
        fail(("serve", "auth"), f"none would let anyone who reaches {bind}:{serve['port']} run prompts and delete the model; "
             "use keys (the default), or bind 127.0.0.1")
    keys_file = serve["keys_file"]
    if keys_file is not None:
        keys_file = os.path.normpath(str(base_dir / Path(keys_file).expanduser()))
    return Serve(
        serve["port"], bind, tuple(env), serve["ready_timeout"], str(keep_alive).strip(), load_timeout,
        serve["read_mb_s"], parallel, serve["single_sequence_above_gib"], serve["memory_limit"], auth, keys_file,
        os.path.normpath(str(base_dir / "api-keys")), serve["read_ahead"],
    )
