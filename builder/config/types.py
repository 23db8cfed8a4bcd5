"""The Config types: what a validated builder.yaml resolves to."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from builder.supervisor.shards import merged_file_name, shard_file_name

DEFAULT_CONFIG_NAME = "builder.yaml"
DEFAULT_NFS_OPTIONS = "rw,nfsvers=4.1,hard"

# Set by builder itself inside the containers; a user value would break the stack.
RESERVED_ENV = {
    "OLLAMA_HOST": "set serve.port and serve.bind instead",
    "OLLAMA_MODELS": "it follows storage",
    "PATH": "the image needs its own",
    "PYTHONPATH": "the supervisor needs its own",
    "LD_LIBRARY_PATH": "the supervisor sets it for each program",
    "BUILDER_RUNTIME": "the supervisor reads it",
    "BUILDER_SERVE": "it carries serve.keep_alive, load_timeout and parallel",
    "BUILDER_GATE": "it carries serve.auth and serve.keys_file",
    "BUILDER_NUM_GPU": "num_gpu: auto is planned by builder (set model.parameters.num_gpu instead)",
}


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
    model_cache: str | None = None  # the merged model and ollama's store on the serving machine's own disk


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
    ram_gib: float | None = None  # RAM + swap of the serving machine; None: read it here


@dataclass(frozen=True)
class KubernetesSettings:
    namespace: str | None
    storage_class: str | None
    storage_size: str
    replicas: int
    gpu_product: str | None = None
    cpu_limit: str = "32"
    memory_limit: str = "auto"
    allow_from_namespaces: tuple[str, ...] = ()  # beyond the pod's own namespace


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
    memory_limit: str = "auto"  # compose and single: auto, none or a quantity
    auth: str = "none"  # keys or none (auto resolved by the bind)
    keys_file: str | None = None  # absolute; None: the target's default place
    keys_beside_config: str | None = None  # the default place for compose and single: api-keys beside builder.yaml
    read_ahead: bool = True  # read the model through the page cache before the load, when RAM holds it

    @property
    def loopback(self) -> bool:
        import ipaddress

        try:
            return ipaddress.ip_address(self.bind).is_loopback
        except ValueError:
            return False

    def limits(self) -> dict:
        """The rule the supervisor sizes ollama by (BUILDER_SERVE; builder.supervisor.limits)."""
        return {
            "keep_alive": self.keep_alive,
            "load_timeout": {"read_mb_s": self.read_mb_s, "seconds": self.load_timeout},
            "parallel": {"single_above_gib": self.single_sequence_above_gib, "value": self.parallel},
            "read_ahead": self.read_ahead,
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
    target: str = "compose"
    host_prefix: str | None = None
    # True once the preflight replaced num_gpu: auto with the plan for the GPUs
    # here: the image keeps "auto" (its digest and runtime.json), the targets
    # hand the number to the create step (BUILDER_NUM_GPU).
    num_gpu_planned: bool = False

    def image_parameters(self) -> tuple[tuple[str, object], ...]:
        """model.parameters as the image holds them: num_gpu: auto stays auto
        (the GPUs are the target's, not the image's)."""
        if not self.num_gpu_planned:
            return self.model.parameters
        return tuple((k, "auto" if k == "num_gpu" else v) for k, v in self.model.parameters)

    @property
    def image(self) -> str:
        return f"{self.image_name}:{self.image_tag}"

    @property
    def ollama_generation(self) -> str:
        """builder.config.releases' generation of ollama.version (validated: never None)."""
        from builder.config.releases import LEGACY, generation

        return generation(self.ollama.version) or LEGACY

    def digest(self) -> str:
        """sha256 of what in the config shapes the image: not where the model
        lies, which GPUs serve it or on which port, so the same config gives
        the same image on every machine."""
        data = asdict(self)
        for host_only in (
            "source", "cache_dir", "storage", "gpus", "serve", "project", "plan", "kubernetes", "github_mirror", "registry_mirror",
            "target", "host_prefix", "num_gpu_planned",
        ):
            data.pop(host_only)
        data["model"]["parameters"] = self.image_parameters()
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()
