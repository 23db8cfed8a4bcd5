"""Config -> Plan: every value the rendered files need, computed once.

Pure: no Docker, no network, no clock. Templates stay flat because the
choices (NFS or bind, which GPUs, which base) are made here as data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from builder import __version__
from builder.config import Config
from builder.supervisor.common import CURRENT
from builder.modelfile import render_modelfile

# Where things live inside the image and the containers.
MODELS_DIR = "/models"
OLLAMA_STORE = "/models/ollama"  # on the model volume, beside the merged file
MODEL_CACHE_DIR = "/cache"  # storage.model_cache: the merged file and ollama's store instead (BUILDER_MODEL_CACHE)
OLLAMA_PORT = 11434  # what the container publishes: ollama, or the gate in front of it (serve.auth: keys)
OLLAMA_INTERNAL_PORT = 11435  # ollama behind the gate, on the container's loopback
KEYS_IN_CONTAINER = "/run/secrets/builder-keys"
KEYS_FILE_NAME = "api-keys"
OLLAMA_PREFIX = "/usr/local"  # bin/ollama and lib/ollama/, as the release archive has them
LLAMA_CPP_BIN = "/opt/llama.cpp/build/bin"
SUPERVISOR_HOME = "/opt/builder"
CONFIG_DIR = "/etc/builder"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The build context holds three trees, each copied onto a folder that every
# Debian/Ubuntu base already has. A COPY that had to create its destination's
# parents would stamp them with the build's clock, and the image ID would
# change from build to build.
STAGED_OLLAMA = "staged/ollama"  # -> /usr/local/ (bin/ollama, lib/ollama/)
STAGED_LLAMA_CPP = "staged/llama.cpp"  # -> /opt/ (llama.cpp/build/bin/)
ROOTFS = "rootfs"  # -> / (the supervisor, the Modelfile, runtime.json)
COPIES = ((STAGED_OLLAMA, OLLAMA_PREFIX + "/"), (STAGED_LLAMA_CPP, "/opt/"), (ROOTFS, "/"))

# Packages the bootstrap base needs: python3 for the supervisor (python3-minimal
# lacks json and http.server), the rest for the binaries (llama.cpp's release
# is linked against libgomp and libcurl).
BASE_PACKAGES = ("ca-certificates", "libcurl4", "libgomp1", "python3")

LABEL_PREFIX = "io.builder"


@dataclass(frozen=True)
class BasePlan:
    """The FROM image: a pinned registry reference, or a bootstrap built locally."""

    image: str
    bootstrap: bool
    distro: str | None
    suite: str | None
    mirror: str | None
    packages: tuple[str, ...]


@dataclass(frozen=True)
class Blueprint:
    config: Config
    config_digest: str
    image: str
    base: BasePlan
    labels: tuple[tuple[str, str], ...]
    image_env: tuple[tuple[str, str], ...]
    user: str
    modelfile: str
    runtime: dict[str, Any]
    compose: dict[str, Any]
    # serve's memory limits, derived by the preflight from the plan (None: no
    # limit in compose and single; Kubernetes falls back to 256Gi)
    memory_limit: str | None = None
    k8s_memory_limit: str | None = None


def mirrored(url: str, github_mirror: str) -> str:
    """Put the GitHub mirror prefix before a GitHub URL (`https://PROXY/https://github.com/...`)."""
    if github_mirror and url.startswith(("https://github.com/", "http://github.com/")):
        return github_mirror.rstrip("/") + "/" + url
    return url


def registry_mirrored(ref: str, registry_mirror: str) -> str:
    """Put the registry mirror before a reference, naming the registry in full
    (`MIRROR/docker.io/library/debian@sha256:...`), the form pull-through mirrors take."""
    if not registry_mirror:
        return ref
    name = ref.split("@", 1)[0]
    first = name.split("/", 1)[0]
    if "/" not in name or ("." not in first and ":" not in first and first != "localhost"):
        ref = "docker.io/" + (ref if "/" in name else "library/" + ref)
    return registry_mirror.rstrip("/") + "/" + ref


def plan_base(config: Config) -> BasePlan:
    base = config.base
    if base.ref:
        return BasePlan(registry_mirrored(base.ref, config.registry_mirror), False, None, None, None, ())
    packages = tuple(sorted(set(BASE_PACKAGES) | set(base.packages)))
    assert base.distro and base.suite and base.mirror
    inputs = "\n".join([base.distro, base.suite, base.mirror, str(config.source_date_epoch), *packages])
    digest = hashlib.sha256(inputs.encode()).hexdigest()[:12]
    image = f"builder-base:{base.distro}-{base.suite}-{digest}"
    return BasePlan(image, True, base.distro, base.suite, base.mirror, packages)


def make_blueprint(config: Config, memory_limit: str | None = None, k8s_memory_limit: str | None = None) -> Blueprint:
    """Compute everything the build context holds; the memory limits come
    from the preflight (builder.preflight.Preflight.memory_limit)."""
    model = config.model
    digest = config.digest()
    merged_path = str(PurePosixPath(MODELS_DIR, model.merged))
    header = f"Rendered by builder {__version__} for {model.name}; change the config, not this file."
    current = config.ollama_generation == CURRENT
    # ollama 0.30+ creates from the shards: by hand, `FROM` their folder (builder names each shard's blob).
    source = str(PurePosixPath(MODELS_DIR, model.shards.first).parent) if current and model.shards.count else merged_path
    modelfile = render_modelfile(source, config.image_parameters(), model.template, model.system, header)
    labels = (
        ("org.opencontainers.image.title", config.image_name),
        ("org.opencontainers.image.version", config.image_tag),
        (f"{LABEL_PREFIX}.builder.version", __version__),
        (f"{LABEL_PREFIX}.config.sha256", digest),
        (f"{LABEL_PREFIX}.llama-cpp.build", config.llama_cpp.version),
        (f"{LABEL_PREFIX}.model", model.name),
        (f"{LABEL_PREFIX}.ollama.version", config.ollama.version),
    )
    image_env = (
        ("PATH", f"{LLAMA_CPP_BIN}:{IMAGE_PATH}"),
        # llama.cpp's release binaries carry their CI folder as RUNPATH; the
        # supervisor drops this again for ollama, whose own libraries differ.
        ("LD_LIBRARY_PATH", LLAMA_CPP_BIN),
        ("OLLAMA_HOST", f"0.0.0.0:{OLLAMA_PORT}"),
        ("OLLAMA_MODELS", OLLAMA_STORE),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("PYTHONPATH", SUPERVISOR_HOME),
        # Not root: HOME is somewhere this user can write (ollama keeps its key there).
        ("HOME", "/tmp/builder-home"),
    )
    shards = model.shards
    create_request = {"parameters": {name: list(value) if name == "stop" else value for name, value in config.image_parameters()}}
    if model.template is not None:
        create_request["template"] = model.template
    if model.system is not None:
        create_request["system"] = model.system
    runtime = {
        "config_sha256": digest,
        # What `create` POSTs to /api/create, as the Modelfile says it.
        "create": create_request,
        "gguf_split": f"{LLAMA_CPP_BIN}/llama-gguf-split",
        "merge_tool": model.merge_tool,
        "merged": merged_path,
        "model": model.name,
        "modelfile": f"{CONFIG_DIR}/Modelfile",
        "models_dir": MODELS_DIR,
        "ollama": f"{OLLAMA_PREFIX}/bin/ollama",
        "ollama_store": OLLAMA_STORE,
        "port": OLLAMA_PORT,
        "shards": {
            "count": shards.count,
            "first": str(PurePosixPath(MODELS_DIR, shards.first)),
            "prefix": shards.prefix,
        },
    }
    if current:
        # Left out for 0.5.x, whose rendered files stay as they were.
        runtime["ollama_generation"] = CURRENT
    image = config.image
    return Blueprint(
        config=config,
        config_digest=digest,
        image=image,
        base=plan_base(config),
        labels=labels,
        image_env=image_env,
        user=f"{config.uid}:{config.gid}",
        modelfile=modelfile,
        runtime=runtime,
        compose=_compose_values(config, image, digest, memory_limit),
        memory_limit=memory_limit,
        k8s_memory_limit=k8s_memory_limit,
    )


def keys_file(config: Config, prefix: str | None = None) -> str:
    """Where the API keys live on this machine: serve.keys_file, else beside
    the config (the host target: in its prefix)."""
    if config.serve.keys_file:
        return config.serve.keys_file
    if prefix is None and config.serve.keys_beside_config:
        return config.serve.keys_beside_config
    return str(PurePosixPath(prefix or ".", KEYS_FILE_NAME))


def gate_env(config: Config, listen: str, upstream: int, keys: str) -> dict[str, str]:
    """BUILDER_GATE for serve.auth: keys: the gate listens where ollama would,
    ollama moves to loopback:upstream, keys from `keys`."""
    if config.serve.auth != "keys":
        return {}
    return {"BUILDER_GATE": json.dumps({"keys": keys, "listen": listen, "upstream": upstream}, sort_keys=True, separators=(",", ":"))}


def create_env(config: Config) -> dict[str, str]:
    """BUILDER_NUM_GPU when num_gpu: auto was planned here: the image says
    auto, the create step takes the number from its environment."""
    if not config.num_gpu_planned:
        return {}
    return {"BUILDER_NUM_GPU": str(dict(config.model.parameters)["num_gpu"])}


def cache_env(config: Config) -> dict[str, str]:
    """BUILDER_MODEL_CACHE when storage.model_cache is set: the supervisor
    then keeps the merged file and ollama's store there (the image does not
    know where the model lives)."""
    if not config.storage.model_cache:
        return {}
    return {"BUILDER_MODEL_CACHE": MODEL_CACHE_DIR}


def _compose_values(config: Config, image: str, digest: str, memory_limit: str | None = None) -> dict[str, Any]:
    storage = config.storage
    if storage.kind == "nfs":
        driver_opts = {
            "type": "nfs",
            "o": f"addr={storage.server},{storage.options}",
            "device": f":{storage.export}",
        }
    else:
        driver_opts = {"type": "none", "o": "bind", "device": storage.path}
    gpus = config.gpus
    if gpus.kind == "none":
        devices: list[dict[str, Any]] = []
    elif gpus.kind == "ids":
        devices = [{"driver": "nvidia", "device_ids": list(gpus.ids), "capabilities": ["gpu"]}]
    else:
        count: Any = "all" if gpus.kind == "all" else gpus.count
        devices = [{"driver": "nvidia", "count": count, "capabilities": ["gpu"]}]
    return {
        "project": config.project,
        "image": image,
        "labels": {f"{LABEL_PREFIX}.project": config.project, f"{LABEL_PREFIX}.config.sha256": digest},
        "volume_labels": {f"{LABEL_PREFIX}.project": config.project},
        "driver_opts": driver_opts,
        "gpu_devices": devices,
        "port": {
            "target": OLLAMA_PORT,
            "published": str(config.serve.port),
            "host_ip": config.serve.bind,
            "protocol": "tcp",
        },
        # What serve's environment gets: BUILDER_SERVE (the rule the supervisor
        # sizes ollama's limits by, at start, from the model's size), then serve.env.
        # BUILDER_NUM_GPU too, though only create reads it: another plan recreates serve, which then loads the new model.
        "serve_env": {"BUILDER_SERVE": json.dumps(config.serve.limits(), sort_keys=True, separators=(",", ":")), **create_env(config),
                      **cache_env(config),
                      **gate_env(config, f"0.0.0.0:{OLLAMA_PORT}", OLLAMA_INTERNAL_PORT, KEYS_IN_CONTAINER), **dict(config.serve.env)},
        # serve.auth: keys: the host file the serve container reads its keys from.
        "keys_file": keys_file(config) if config.serve.auth == "keys" else None,
        # What the create step's environment gets: num_gpu planned for the GPUs here (num_gpu: auto).
        "create_env": {**create_env(config), **cache_env(config)},
        # storage.model_cache: a bind mount of that folder; the model volume is then only read.
        "model_cache": config.storage.model_cache,
        "model_cache_dir": MODEL_CACHE_DIR,
        "cache_env": cache_env(config),
        "models_dir": MODELS_DIR,
        # Compose's mem_limit takes Docker's units: 64g, not Kubernetes' 64Gi
        "mem_limit": memory_limit.replace("Gi", "g").replace("Mi", "m").replace("Ki", "k").replace("Ti", "t") if memory_limit else None,
    }
