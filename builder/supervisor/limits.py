"""ollama's own limits, sized to the model: load timeout, parallel sequences,
loaded models, keep-alive. One rule, used by the planner on the host (from
the shards' headers) and by the supervisor in the image (from the merged
file's size), so both say the same number. Standard library only.

- OLLAMA_LOAD_TIMEOUT: ollama 0.5.7 gives up on a load that makes no progress
  for this long (default 5 minutes; `envconfig.LoadTimeout`, reset on progress
  in `llm/server.go` WaitUntilRunning). Reading a 150 GB file from NFS makes
  no reported progress for minutes, the most reported R1 failure (ollama
  #8690). Rule: the time to read the whole model at the storage's read rate,
  never below ollama's 5 minutes (unless set explicitly).
- OLLAMA_NUM_PARALLEL: with it unset, ollama 0.5.7 runs 4 sequences when the
  model fits the GPUs (or on CPU only), each with num_ctx of KV cache
  (`server/sched.go`). Rule: 1 for models above a size, else 4.
- OLLAMA_MAX_LOADED_MODELS: 1; these stacks serve one model.
- OLLAMA_KEEP_ALIVE: forever (-1) by default: a 150 GB load is not repeated
  because nobody asked for five minutes.
"""

from __future__ import annotations

import math

OLLAMA_MINIMUM_LOAD_TIMEOUT = 300  # ollama's own default, seconds
GB = 1000**3
GIB = 1 << 30


def load_timeout_seconds(model_bytes: int, rule: dict) -> int:
    """The load timeout for a model of `model_bytes` under `rule` (runtime.json's serve.load_timeout)."""
    if rule.get("seconds") is not None:
        return int(rule["seconds"])
    rate = float(rule["read_mb_s"]) * 1000**2
    return max(OLLAMA_MINIMUM_LOAD_TIMEOUT, math.ceil(model_bytes / rate))


def parallel_sequences(model_bytes: int, rule: dict) -> int:
    """OLLAMA_NUM_PARALLEL for a model of `model_bytes` under `rule` (runtime.json's serve.parallel)."""
    if rule.get("value") is not None:
        return int(rule["value"])
    return 1 if model_bytes > float(rule["single_above_gib"]) * GIB else 4


def ollama_limits(model_bytes: int, serve: dict) -> dict[str, str]:
    """The environment that sizes ollama for this model (before serve.env, which wins)."""
    return {
        "OLLAMA_KEEP_ALIVE": str(serve["keep_alive"]),
        "OLLAMA_LOAD_TIMEOUT": f"{load_timeout_seconds(model_bytes, serve['load_timeout'])}s",
        "OLLAMA_MAX_LOADED_MODELS": "1",
        "OLLAMA_NUM_PARALLEL": str(parallel_sequences(model_bytes, serve["parallel"])),
    }


def explain(model_bytes: int, serve: dict) -> list[str]:
    """Why each value: one line each, for `builder plan` and the serve log."""
    timeout = serve["load_timeout"]
    parallel = serve["parallel"]
    seconds = load_timeout_seconds(model_bytes, timeout)
    if timeout.get("seconds") is not None:
        why_timeout = "serve.load_timeout"
    else:
        read = math.ceil(model_bytes / (float(timeout["read_mb_s"]) * 1000**2))
        why_timeout = (
            f"{model_bytes / GB:.1f} GB read at {float(timeout['read_mb_s']):g} MB/s takes {read} s"
            + (f"; never below ollama's {OLLAMA_MINIMUM_LOAD_TIMEOUT} s" if read < OLLAMA_MINIMUM_LOAD_TIMEOUT else "")
        )
    sequences = parallel_sequences(model_bytes, parallel)
    if parallel.get("value") is not None:
        why_parallel = "serve.parallel"
    else:
        side = "above" if sequences == 1 else "not above"
        why_parallel = f"the model is {side} {float(parallel['single_above_gib']):g} GiB (serve.parallel: auto)"
    return [
        f"OLLAMA_LOAD_TIMEOUT={seconds}s: {why_timeout}",
        f"OLLAMA_NUM_PARALLEL={sequences}: {why_parallel}; the KV cache is num_ctx x {sequences}",
        "OLLAMA_MAX_LOADED_MODELS=1: one model per stack",
        f"OLLAMA_KEEP_ALIVE={serve['keep_alive']}: " + ("loaded for good once warmed up" if str(serve["keep_alive"]).startswith("-") else "serve.keep_alive"),
    ]
