"""The model's facts, read once from the shards' GGUF headers (never their
tensor data): which files, how long, which architecture and tokenizer, the
blocks and tensor sizes the planner needs. Every later check takes this
value; nothing after it opens a shard again, and with a model cache that is
up to date nothing opens one at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from builder.config import Config
from builder.errors import ConfigError, Problem
from builder.render.offload import ModelShape, model_shape
from builder.supervisor.common import LEGACY
from builder.supervisor.gguf import GGUFError, GGUFHeader
from builder.supervisor.shards import shard_file_names


@dataclass(frozen=True)
class ModelFacts:
    """What the shards' headers say, with where they were read."""

    folder: Path
    names: tuple[str, ...]
    headers: tuple[GGUFHeader, ...]
    file_bytes: int  # the shards' sizes on disk
    architecture: str
    shape: ModelShape
    merged_present: bool = False  # ollama 0.5.7: the merged file is already there, whole

    @property
    def tokenizer(self) -> str:
        return str(self.headers[0].metadata.get("tokenizer.ggml.model", ""))

    @property
    def blocks(self) -> int:
        return self.shape.block_count

    @property
    def tensor_bytes(self) -> int:
        return self.shape.total_bytes


def shard_names(config: Config) -> list[str]:
    shards = config.model.shards
    return shard_file_names(shards.prefix, shards.count) if shards.count else [PurePosixPath(shards.first).name]


def merged_here(config: Config, shards: Path) -> Path:
    """Where this machine sees the merged file: in the model cache, else beside the shards."""
    if config.storage.model_cache:
        return Path(config.storage.model_cache) / config.model.merged
    return shards / PurePosixPath(config.model.merged).name


def shard_folder(config: Config, override: Path | None = None) -> Path | None:
    """Where this machine can read the shards: `override` (--shards), plan.shards_dir, else local storage."""
    if override is not None:
        return override
    if config.plan.shards_dir:
        return Path(config.plan.shards_dir)
    if config.storage.kind == "local":
        return Path(config.storage.path) / config.model.shards.folder
    return None


def _cached_header(config: Config, folder: Path, names: list[str], merged: Path) -> GGUFHeader | None:
    """ollama 0.5.7 with a model cache: a merged file there whose merge record
    still matches the shards (a stat of each: size and time) stands for them.
    Its header is read from the cache and nothing from the model volume, so a
    restart reads no byte of the shards. None when anything differs: then the
    shards are read and checked as on a first deploy."""
    from builder.supervisor.common import StepError
    from builder.supervisor.gguf import check_file
    from builder.supervisor.merge import shard_states, up_to_date

    if not config.storage.model_cache or config.ollama_generation != LEGACY:
        return None
    try:
        if not up_to_date(shard_states(str(folder), names), str(merged)):
            return None
        return check_file(str(merged), merged.stat().st_size)
    except (StepError, GGUFError, OSError):
        return None


def _problem(config: Config, key: str, message: str) -> ConfigError:
    return ConfigError(Problem(key, message, None, config.source))


def read_model(config: Config, folder: Path | None = None, whole: bool = True) -> ModelFacts | None:
    """Read every shard's header once. With `whole` (validate, up, doctor),
    every shard must be present, as long as its header says and part of this
    split, exactly as the merge step checks them; without it (`plan` over
    header-only copies), only the headers are needed. Either way the model
    must be one the chosen ollama can load. None when the shards cannot be
    read from here (NFS, no plan.shards_dir). With a model cache whose merged
    file still matches its record, that file's header stands for the shards
    (_cached_header): a restart reads nothing from the model volume."""
    from builder.supervisor.common import StepError
    from builder.supervisor.gguf import check_file, read_header_file
    from builder.supervisor.loadable import NotLoadable, check_loadable
    from builder.supervisor.merge import check_shards, shard_states

    folder = shard_folder(config, folder)
    if folder is None:
        return None
    names = shard_names(config)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise _problem(config, "model.shards", f"{len(missing)} of {len(names)} shard(s) missing in {folder}: {listed}; copy them there and run again")
    count = config.model.shards.count
    merged = merged_here(config, folder)
    cached = _cached_header(config, folder, names, merged) if whole and count else None
    try:
        if cached is not None:
            headers = [cached]
        elif whole and count:
            states = shard_states(str(folder), names)
            headers, _ = check_shards(str(folder), states, count)
        elif whole:
            headers = [check_file(str(folder / names[0]), (folder / names[0]).stat().st_size)]
        else:
            headers = [read_header_file(str(folder / name)) for name in names]
        read = [(str(merged), cached)] if cached is not None else [(str(folder / name), header) for name, header in zip(names, headers)]
        architecture = check_loadable(read, config.ollama_generation)
        shape = model_shape(headers)
    except StepError as exc:
        raise _problem(config, "model.shards", str(exc).removeprefix("merge: ")) from None
    except (GGUFError, OSError) as exc:
        raise _problem(config, "model.shards", f"{folder / names[0]} {exc}") from None
    except (NotLoadable, ValueError) as exc:
        raise _problem(config, "model.shards", str(exc)) from None
    present = cached is not None
    if whole and count and not present and merged.is_file() and config.ollama_generation == LEGACY:  # 0.30+ never reads it
        try:
            check_file(str(merged), merged.stat().st_size)
            present = True
        except GGUFError as exc:
            if not config.storage.model_cache:
                raise _problem(config, "model.merged", f"{merged} {exc}; delete it and `builder up` merges again") from None
            # In the model cache: the merge finds it does not match its record and merges again from the model volume.
    file_bytes = sum((folder / name).stat().st_size for name in names)
    return ModelFacts(folder, tuple(names), tuple(headers), file_bytes, architecture, shape, present)
