"""Names of split GGUF files, as llama-gguf-split writes them.

A split model is `PREFIX-%05d-of-%05d.gguf` (shard numbers from 1); the
merged file is `PREFIX.gguf`, derived from the shards so the two can never
disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>[0-9]{5})-of-(?P<count>[0-9]{5})\.gguf$")


@dataclass(frozen=True)
class ShardName:
    prefix: str
    number: int
    count: int


def parse_shard_name(name: str) -> ShardName | None:
    """Parse `PREFIX-0000k-of-0000N.gguf`; None when `name` is not a shard name."""
    match = SHARD_RE.match(name)
    if not match:
        return None
    return ShardName(match["prefix"], int(match["no"]), int(match["count"]))


def shard_file_name(prefix: str, number: int, count: int) -> str:
    """The file name of shard `number` (1-based) of `count`."""
    return f"{prefix}-{number:05d}-of-{count:05d}.gguf"


def shard_file_names(prefix: str, count: int) -> list[str]:
    """Every shard's file name, in order."""
    return [shard_file_name(prefix, n, count) for n in range(1, count + 1)]


def merged_file_name(prefix: str) -> str:
    """The merged model's file name for shards named `PREFIX-...`."""
    return f"{prefix}.gguf"
