#!/usr/bin/env python3
"""run_cases_032.py: run_cases.py's cases against a real ollama 0.32.15 (CUDA).

Runs ON THE GPU MACHINE, from the repository root, after device_build_032.sh
(which builds the CPU and CUDA backends from llama.cpp 4df29be4f with ollama
0.32.15's llama/server and assembles WORK/carried/ollama-linux-amd64.tar.zst).
Everything is run_cases.Run (imported, not copied); what differs for 0.30+:

- the config names `ollama.version: 0.32.15` (builder then creates from the
  shards: no merge; ollama rewrites them into one blob with llama-quantize);
- the runner is `lib/ollama/llama-server` (capture() also lists it);
- the serve-log filter keeps llama-server's lines (load_tensors, llama_context,
  KV/compute buffers, the fit step, the memory breakdown) and ollama 0.32's
  scheduler lines (gpu memory, llama-server model predicted, OOM retry);
- after each case, the llama-server lines about buffers are also written as
  `buffers` into the row, and the runner's command line (-c, -ngl, -b/-ub,
  --flash-attn) as `runner_cmdline`.

    python3 bench/gpu/run_cases_032.py --work WORK --out DIR --cards 24 --ctx 2048 8192 [--blocks 12]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_cases  # noqa: E402  (bench/gpu/run_cases.py)

VERSION = os.environ.get("BENCH_OLLAMA_VERSION", "0.32.15")

run_cases.LOG_PATTERNS = re.compile(
    run_cases.LOG_PATTERNS.pattern + r"|load_tensors|llama_context|llama_kv|kv_cache|KV buffer|compute buffer|n_ctx|n_batch|"
    r"n_ubatch|flash_attn|fit|memory breakdown|\| +- |CUDA0|CUDA_Host|CPU_Mapped|model buffer|graph|llama-server|"
    r"gpu memory|system memory|predicted|reducing|retry|evict|Load failed|error|inference compute|library=|"
    r"offload|layers|starting|server is listening|all slots|model loaded|cudaMalloc|ggml_backend_cuda|ggml_cuda|"
    r"using device|Device 0|load_backend|total VRAM|vram|size_vram|context size",
    re.I,
)
BUFFER_LINES = re.compile(r"buffer size|KV buffer|compute buffer|offloaded|n_ctx|n_ubatch|n_batch|flash_attn|"
                          r"memory breakdown|\| +- |graph nodes|graph splits|out of memory|failed to allocate|fit", re.I)


class Run032(run_cases.Run):
    def write_config(self, card, ctx, num_gpu, override=None):
        super().write_config(card, ctx, num_gpu, override)
        text = self.cfg.read_text()
        if "\nollama:" not in text:
            text = text.replace("\ncache_dir:", f"\nollama:\n  version: \"{VERSION}\"\ncache_dir:", 1)
            self.cfg.write_text(text)
            self.raw.write(f"\n===== {self.cfg} (with ollama.version {VERSION})\n{text}\n")

    def runner_cmdlines(self) -> dict:
        found = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and (argv[0].endswith(b"llama-server") or argv[0].endswith(b"ollama_llama_server")):
                found[pid] = " ".join(a.decode(errors="replace") for a in argv if a)
        return found

    def capture(self, title):
        got = super().capture(title)
        runners = self.runner_cmdlines()
        got["runners"].update(runners)
        self.raw.write(f"===== llama-server cmdlines {title}\n{runners}\n")
        return got

    def case(self, card, ctx, base_used):
        off = self.log_offset()
        row = super().case(card, ctx, base_used)
        try:
            lines = open(self.serve_log, "rb").read()[off:].decode(errors="replace").splitlines()
        except OSError:
            lines = []
        row["buffers"] = [ln for ln in lines if BUFFER_LINES.search(ln)][-80:]
        return row

    def load_probe(self, n, ctx):
        r = super().load_probe(n, ctx)
        r["runner_cmdline"] = self.runner_cmdlines()
        smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
        r["apps"] = smi
        return r


if __name__ == "__main__":
    Run032(run_cases.parse()).main()
