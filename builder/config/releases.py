"""Which ollama releases builder supports, and what each generation needs.

Two generations, decided from `ollama.version` at render time:

* "0.5" (0.5.x, the default 0.5.7): a `.tgz` release whose Go binary runs its
  own llama.cpp runner. It cannot load split GGUF files, so the shards are
  merged into one file, which is hard-linked into the blob store and named
  in `POST /api/create`: no copy.
* "0.30" (0.30 and later, tested with 0.32.15): a `.tar.zst` release whose
  binary runs `lib/ollama/llama-server`. `POST /api/create` takes every
  shard's blob in `files` and writes one new blob (llama-quantize COPY), so
  there is no merge step: the shards are hard-linked into the store, and
  ollama's own rewrite is the one copy.

Versions before 0.5, and 0.6 to 0.29 (0.25 to 0.29 were never released),
which changed the runner and the archive format more than once, are refused
with one line; so are 0.30.0's first release candidates (rc0 to rc15), whose
create had no split-GGUF support yet.
"""

from __future__ import annotations

import re

from builder.supervisor.common import CURRENT, LEGACY
TESTED_CURRENT = "0.32.15"
SUPPORTED = f"0.5.x (default 0.5.7) or 0.30 and later (tested with {TESTED_CURRENT})"
GITHUB_RELEASE = "https://github.com/ollama/ollama/releases/download/v{version}/ollama-linux-amd64"
ARCHIVE_SUFFIX = {LEGACY: ".tgz", CURRENT: ".tar.zst"}

_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-rc\d+)?$")


def generation(version: str) -> str | None:
    """"0.5", "0.30", or None for a version builder does not support."""
    match = _VERSION.match(version)
    if not match:
        return None
    major, minor = int(match[1]), int(match[2])
    if (major, minor) == (0, 5):
        return LEGACY
    rc = re.search(r"-rc(\d+)$", version)
    if version.startswith("0.30.0-") and rc and int(rc[1]) < 16:
        return None  # 0.30.0-rc0 to rc15 create without the split-GGUF support and the rewrite
    if major >= 1 or minor >= 30:
        return CURRENT
    return None


def default_url(version: str) -> str:
    """ollama's own release asset for `version`: .tgz for 0.5.x, .tar.zst after."""
    return GITHUB_RELEASE.replace("{version}", version) + ARCHIVE_SUFFIX[generation(version) or LEGACY]
