"""The config's JSON Schema: the shape pass of validation, and `builder schema`.

Only the shape lives here (types, ranges, patterns, which keys exist).
Meaning (shard names agree, values representable in a Modelfile, ...) is
checked in config.py once the shape is known to be right. Defaults live in
defaults.yaml so that "unset" stays distinct from "default".
"""

from __future__ import annotations

from typing import Any

# Ollama's PARAMETER names (api/types.go, Options and Runner, v0.5.7) and the
# JSON type each takes. `ollama create` rejects any other name ("unknown
# parameter") and a wrong type fails only when the model loads, so both are
# config errors here. Deprecated ones (penalize_newline, f16_kv) are left out.
OLLAMA_PARAMETERS: dict[str, str] = {
    "num_ctx": "integer",
    "num_batch": "integer",
    "num_gpu": "integer",
    "main_gpu": "integer",
    "num_thread": "integer",
    "num_keep": "integer",
    "num_predict": "integer",
    "seed": "integer",
    "top_k": "integer",
    "repeat_last_n": "integer",
    "mirostat": "integer",
    "temperature": "number",
    "top_p": "number",
    "min_p": "number",
    "typical_p": "number",
    "repeat_penalty": "number",
    "presence_penalty": "number",
    "frequency_penalty": "number",
    "mirostat_tau": "number",
    "mirostat_eta": "number",
    "low_vram": "boolean",
    "use_mmap": "boolean",
    "use_mlock": "boolean",
    "stop": "stop",
}

_HEX64 = "^[0-9a-f]{64}$"
_URL = "^https?://[^\\s]+$"


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def _str(description: str, expect: str | None = None, **extra: Any) -> dict[str, Any]:
    """A string key; `expect` words what a valid value looks like, for errors."""
    schema = {"type": "string", "description": description, **extra}
    if expect:
        schema["x-expect"] = expect
    return schema


_MODEL_CACHE = _str(
    "A folder on the serving machine's own fast disk for the merged model and ollama's store; the model storage is then "
    "only read (the shards, once per machine). Relative paths are relative to the config file.", minLength=1,
)


def _parameter_schema(kind: str) -> dict[str, Any]:
    if kind == "stop":
        return {
            "description": "Stop sequence(s): a string or a list of strings.",
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            ],
        }
    if kind == "integer":
        return {"type": "integer"}
    if kind == "number":
        return {"type": "number"}
    return {"type": "boolean"}


def _parameters() -> dict[str, Any]:
    properties = {name: _parameter_schema(kind) for name, kind in OLLAMA_PARAMETERS.items()}
    properties["num_gpu"] = {
        "description": "Layers offloaded to the GPUs: a whole number, or `auto`.",
        "oneOf": [{"type": "integer", "minimum": 0}, {"const": "auto"}],
    }
    properties["num_ctx"] = {"type": "integer", "minimum": 1}
    properties["temperature"] = {"type": "number", "minimum": 0}
    return _obj(properties, description="Modelfile PARAMETER lines.")


def config_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of builder.yaml."""
    release = {
        "sha256": {
            "description": "Expected sha256 of the archive (else builder.lock is used).",
            "oneOf": [{"type": "string", "pattern": _HEX64, "x-expect": "64 lowercase hex digits"}, {"type": "null"}],
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "builder.yaml",
        "type": "object",
        "additionalProperties": False,
        "required": ["version", "model", "storage"],
        "properties": {
            "version": {"description": "Config format version.", "const": 1},
            "target": {
                "description": "Where the stack runs: compose (three services on this host), single (one container), kubernetes (manifests for kubectl), host (processes on this machine, no container engine). `--target` overrides it.",
                "enum": ["compose", "single", "kubernetes", "host"],
            },
            "host": _obj(
                {
                    "prefix": {
                        "description": "Where the host target keeps the staged releases, the supervisor, its pid file and log (default $XDG_DATA_HOME/builder/PROJECT); e.g. on a data disk.",
                        "type": ["string", "null"],
                    },
                }
            ),
            "project": _str(
                "Compose project name; also names the volume and containers.",
                expect="lowercase letters, digits, - and _ (a Compose project name)",
                pattern="^[a-z0-9][a-z0-9_-]{0,62}$",
            ),
            "cache_dir": {
                "description": "Where downloads are cached (relative to the config file); default ~/.cache/builder.",
                "oneOf": [{"type": "string", "minLength": 1}, {"type": "null"}],
            },
            "image": _obj(
                {
                    "name": _str("Image repository.", "a lowercase image name such as builder-tiny or registry.example/team/name", pattern="^[a-z0-9]+([._/-][a-z0-9]+)*$"),
                    "tag": _str("Image tag.", "letters, digits, _ . - (an image tag)", pattern="^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"),
                    "uid": {"description": "User the containers run as (match the model storage's owner; NFS root_squash).", "type": "integer", "minimum": 0, "maximum": 2147483647},
                    "gid": {"description": "Group the containers run as.", "type": "integer", "minimum": 0, "maximum": 2147483647},
                    "source_date_epoch": {
                        "description": "SOURCE_DATE_EPOCH for reproducible builds.",
                        "type": "integer",
                        "minimum": 315532800,
                    },
                    "base": {
                        "description": "The base image: a registry reference pinned by digest, or a bootstrap from a mirror.",
                        "oneOf": [
                            _obj(
                                {"ref": _str("Registry reference pinned by digest: NAME@sha256:HEX.")},
                                ("ref",),
                            ),
                            _obj(
                                {
                                    "bootstrap": _obj(
                                        {
                                            "distro": {"enum": ["debian", "ubuntu"]},
                                            "suite": _str("Release codename.", "a codename such as bookworm or jammy", pattern="^[a-z]+$"),
                                            "packages": {
                                                "description": "Extra packages for the base.",
                                                "type": "array",
                                                "items": {"type": "string", "pattern": "^[a-z0-9][a-z0-9+.-]+$", "x-expect": "a package name"},
                                            },
                                        }
                                    )
                                },
                                ("bootstrap",),
                            ),
                        ],
                    },
                }
            ),
            "ollama": _obj(
                {
                    "version": _str("ollama release: 0.5.x (default 0.5.7) or 0.30 and later (tested with 0.32.15).", "a release number such as 0.5.7", pattern="^[0-9]+\\.[0-9]+\\.[0-9]+(-rc[0-9]+)?$"),
                    "url": {
                        "description": "Download URL template; {version} is replaced. Default (null): ollama's GitHub release, ollama-linux-amd64.tgz for 0.5.x and .tar.zst from 0.30.",
                        "oneOf": [{"type": "string", "pattern": _URL, "x-expect": "an http(s):// URL"}, {"type": "null"}],
                    },
                    **release,
                }
            ),
            "llama_cpp": _obj(
                {
                    "build": _str("llama.cpp release build, e.g. b4610.", "a build name such as b4610", pattern="^b[0-9]+$"),
                    "url": _str("Download URL template; {build} is replaced.", "an http(s):// URL", pattern=_URL),
                    **release,
                    "binaries": {
                        "description": "llama.cpp programs to put in the image, with the libraries they load.",
                        "type": "array",
                        "items": {"type": "string", "pattern": "^llama-[a-z0-9-]+$", "x-expect": "a program name such as llama-server"},
                        "minItems": 1,
                        "uniqueItems": True,
                    },
                }
            ),
            "mirrors": _obj(
                {
                    "github": _str(
                        "Prefix put before every GitHub URL (https://PROXY/https://github.com/...); empty for none.",
                        "an http(s):// prefix such as https://ghproxy.example/ (or empty)",
                        pattern="^(|https?://[^\\s]+)$",
                    ),
                    "registry": _str(
                        "Registry mirror put before image references (HOST[/PATH]); empty for none.",
                        "HOST[:PORT][/PATH] such as registry.example.cn (or empty)",
                        pattern="^(|[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*)$",
                    ),
                    "debian": _str("Debian mirror for the bootstrap base.", "an http(s):// URL", pattern=_URL),
                    "ubuntu": _str("Ubuntu mirror for the bootstrap base.", "an http(s):// URL", pattern=_URL),
                }
            ),
            "model": _obj(
                {
                    "name": _str(
                        "The ollama model name, NAME[:TAG].",
                        "NAME[:TAG] in lowercase, such as deepseek-r1:671b-ud-iq1_m",
                        pattern="^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)?(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?$",
                    ),
                    "shards": _str(
                        "First shard (PREFIX-00001-of-0000N.gguf) or its folder, relative to the model storage.",
                        minLength=1,
                    ),
                    "merged": _str("Merged file, relative to the model storage; derived from the shards when omitted.", minLength=1),
                    "parameters": _parameters(),
                    "merge_tool": {
                        "description": "What joins the shards: builder (hashes as it writes, same bytes) or llama-gguf-split.",
                        "enum": ["builder", "llama-gguf-split"],
                    },
                    "template": _str("Modelfile TEMPLATE (Go template)."),
                    "system": _str("Modelfile SYSTEM message."),
                },
                ("name", "shards"),
            ),
            "storage": {
                "description": "Where the model lives: an NFS export, or a local path.",
                "oneOf": [
                    _obj(
                        {
                            "nfs": _obj(
                                {
                                    "server": _str("NFS server IP address (not a host name)."),
                                    "export": _str("Exported path on the server.", "an absolute path such as /export/models", pattern="^/"),
                                    "options": _str("Mount options (addr= is added).", "comma-separated options such as rw,nfsvers=4.1,hard", pattern="^[A-Za-z0-9_.=:-]+(,[A-Za-z0-9_.=:-]+)*$"),
                                },
                                ("server", "export"),
                            ),
                            "model_cache": _MODEL_CACHE,
                        },
                        ("nfs",),
                    ),
                    _obj({"local": _str("Host folder; relative paths are relative to the config file.", minLength=1),
                          "model_cache": _MODEL_CACHE}, ("local",)),
                ],
            },
            "gpus": {
                "description": "GPUs for serve: all, none, a count, or a list of device ids.",
                "oneOf": [
                    {"enum": ["all", "none"]},
                    {"type": "integer", "minimum": 1},
                    {
                        "type": "array",
                        "items": {
                            "type": ["string", "integer"],
                            "pattern": "^[A-Za-z0-9-]+$",
                            "minimum": 0,
                            "x-expect": "a device index or UUID",
                        },
                        "minItems": 1,
                        "uniqueItems": True,
                    },
                ],
            },
            "plan": _obj(
                {
                    "gpu_memory_gib": {
                        "description": "Memory of each GPU serve gets, in GiB, for num_gpu: auto and `builder plan` (else nvidia-smi is asked).",
                        "type": "array",
                        "items": {"type": "number", "exclusiveMinimum": 0},
                        "minItems": 1,
                    },
                    "margin_gib": {"description": "Memory left free on each GPU, in GiB.", "type": "number", "minimum": 0},
                    "ram_gib": {
                        "description": "RAM plus swap a load may use on the machine that serves, in GiB (else /proc/meminfo and this process's memory cgroup, the smaller, are read).",
                        "type": "number",
                        "exclusiveMinimum": 0,
                    },
                    "shards_dir": _str(
                        "Where this machine can read the shards' folder (e.g. the NFS export mounted here), for num_gpu: auto.",
                        minLength=1,
                    ),
                }
            ),
            "kubernetes": _obj(
                {
                    "namespace": _str("Namespace of every manifest (left out: the current one).", pattern="^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"),
                    "storage_class": _str("A StorageClass for the model volume claim, instead of an NFS PersistentVolume.", minLength=1),
                    "storage_size": _str("The model volume's size, e.g. 1Ti.", pattern="^[0-9]+(Ki|Mi|Gi|Ti|Pi)$"),
                    "replicas": {"description": "Serving pods (each with its GPUs).", "type": "integer", "minimum": 1},
                    "allow_from_namespaces": {
                        "description": "Namespaces whose pods may reach the endpoint, besides its own (the NetworkPolicy's sources).",
                        "type": "array",
                        "items": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
                        "uniqueItems": True,
                    },
                    "cpu_limit": {"description": "serve's CPU limit (cores, or a quantity like 500m).", "type": ["string", "integer"], "pattern": "^[0-9]+(\\.[0-9]+)?m?$", "minimum": 1},
                    "memory_limit": _str(
                        "serve's memory limit: auto (the RAM `builder plan` says the part of the model off the GPUs needs, plus 2 GiB, "
                        "when the shards can be read; else 256Gi) or a quantity like 200Gi.",
                        pattern="^(auto|[0-9]+(Ki|Mi|Gi|Ti))$",
                    ),
                    "gpu_product": _str("The GPU model the pods need, as the NVIDIA GPU feature discovery labels nodes (nvidia.com/gpu.product), e.g. NVIDIA-GeForce-RTX-4090.", minLength=1),
                }
            ),
            "serve": _obj(
                {
                    "port": {"description": "Host port for the API.", "type": "integer", "minimum": 1, "maximum": 65535},
                    "bind": _str("Host address the port is published on; beyond loopback, serve.auth asks for API keys."),
                    "ready_timeout": {
                        "description": "Seconds `builder up` waits for the endpoint to list the model and the load to begin (the load itself has no deadline: ollama's stall timer decides).",
                        "type": "integer",
                        "minimum": 1,
                    },
                    "keep_alive": {
                        "description": "How long ollama keeps the model loaded after a request (OLLAMA_KEEP_ALIVE): seconds, or a Go duration such as 30m; -1 is forever.",
                        "type": ["integer", "string"],
                        "x-expect": "-1, a number of seconds, or a duration such as 30m",
                    },
                    "load_timeout": {
                        "description": "OLLAMA_LOAD_TIMEOUT in seconds, or auto: the time to read the model at serve.read_mb_s, never below ollama's 300. ollama gives up on a load after this long without progress, and with mmap llama.cpp reads the whole model before it reports any; `up` waits as long as ollama does and shows the bytes read.",
                        "oneOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}],
                        "x-expect": "a number of seconds or auto",
                    },
                    "read_mb_s": {
                        "description": "How fast the model storage reads, in MB/s (NFS: about 200), for load_timeout: auto.",
                        "type": "number",
                        "exclusiveMinimum": 0,
                    },
                    "parallel": {
                        "description": "OLLAMA_NUM_PARALLEL, or auto: 1 for models above serve.single_sequence_above_gib, else 4. The KV cache is num_ctx times this.",
                        "oneOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}],
                        "x-expect": "a number of sequences or auto",
                    },
                    "read_ahead": {
                        "description": "Before ollama loads the model, read it once through the page cache when the free RAM holds it "
                        "(progress in `up`; the load then reads memory, and ollama's load timeout never meets slow storage).",
                        "type": "boolean",
                    },
                    "auth": _str(
                        "Who may use the endpoint: keys (every request needs Authorization: Bearer KEY; a gate in front of ollama), "
                        "none (only with a loopback serve.bind), or auto: none on loopback, keys otherwise.",
                        enum=["auto", "keys", "none"],
                    ),
                    "keys_file": {
                        "description": "The API keys file (mode 0600; `builder keys` manages it), relative to this file; "
                        "null: keys beside builder.yaml (host target: in the prefix). Never keys in the config itself.",
                        "type": ["string", "null"],
                        "minLength": 1,
                    },
                    "memory_limit": _str(
                        "serve's memory limit in compose and single: auto (the RAM `builder plan` says the part of the model off the GPUs "
                        "needs, plus 2 GiB, when the shards can be read; else none), none, or a quantity like 200Gi.",
                        pattern="^(auto|none|[0-9]+(Ki|Mi|Gi|Ti))$",
                    ),
                    "single_sequence_above_gib": {
                        "description": "With parallel: auto, models larger than this (GiB) get one sequence.",
                        "type": "number",
                        "minimum": 0,
                    },
                    "env": {
                        "description": "Extra environment for ollama serve, e.g. OLLAMA_KEEP_ALIVE.",
                        "type": "object",
                        "propertyNames": {"pattern": "^[A-Z_][A-Z0-9_]*$"},
                        "additionalProperties": {"type": ["string", "integer", "number", "boolean"]},
                    },
                }
            ),
        },
    }
