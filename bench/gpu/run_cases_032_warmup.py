#!/usr/bin/env python3
"""run_cases_032_warmup.py: call 5 (not run yet), the warm-up fix (a8d742e) on a real ollama 0.32.15 (CUDA).

run_cases_032.py's Run032 unchanged, plus one step just before the case's
`builder down`: after the probes (num_gpu 9 loads, 10 fails), /api/ps and the
llama-server command lines polled every second for 15 s (up to 40 s while the
model is not listed), then `builder status` (text, --json), /api/ps, and the
serve log's lines since the first probe (supervisor lines, ollama's GIN and
scheduler lines), written to OUT/after-probes.txt and OUT/after-probes.json.
Run on the device through a copy of run_cases_032.sh with this script named
instead of run_cases_032.py (sed), builder from .gpu/builder-head = HEAD.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/gpu
import run_cases  # noqa: E402
import run_cases_032  # noqa: E402

KEEP = re.compile(r"^supervisor|GIN\]|starting llama-server|llama-server started|loaded runners|Load failed|"
                  r"llama-server terminated|sched\.go:\d+ msg=\"(?:gpu memory|evict|unload|reloading)|waiting for|"
                  r"expired|stopping|stopped|needs reload|reload", re.I)


class Call5(run_cases_032.Run032):
    probe_offset = None

    def load_probe(self, n, ctx):
        if self.probe_offset is None:
            self.probe_offset = self.log_offset()
        return super().load_probe(n, ctx)

    def builder(self, title, *argv, timeout=900):
        if title.startswith("down card") and self.probe_offset is not None:
            try:
                self.after_probes()
            except Exception as e:  # never lose the down
                self.note(f"after_probes failed: {type(e).__name__}: {e}")
        return super().builder(title, *argv, timeout=timeout)

    def after_probes(self):
        t0 = time.time()
        polls = []
        while True:
            el = time.time() - t0
            code, ps, _ = self.api("/api/ps")
            models = [(m.get("name"), m.get("size_vram")) for m in ps.get("models", [])] if isinstance(ps, dict) else ps
            ngl = [re.search(r"(?:-ngl|--n-gpu-layers) (\S+)", c) for c in self.runner_cmdlines().values()]
            polls.append({"t": round(el, 1), "ps": models, "runner_ngl": [m[1] if m else "?" for m in ngl]})
            if el >= 15 and (models or el >= 40):
                break
            time.sleep(1)
        got = self.capture("after probes (+%.0f s)" % (time.time() - t0))
        code, ps, _ = self.api("/api/ps")
        with open(self.serve_log, "rb") as f:
            f.seek(self.probe_offset)
            lines = f.read().decode(errors="replace").splitlines()
        kept = [ln[:400] for ln in lines if KEEP.search(ln)]
        with open(self.serve_log, "rb") as f:
            sup_all = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.startswith("supervisor")]
        out = {"polls": polls, "status_text": got["status_text"], "status_json": got["status_json"],
               "api_ps_end": ps, "runners_end": self.runner_cmdlines(), "smi_end": self.smi(),
               "log_since_first_probe": kept, "supervisor_lines_all": sup_all}
        (self.out / "after-probes.json").write_text(json.dumps(out, indent=1, default=str))
        with open(self.out / "after-probes.txt", "w") as w:
            w.write("== polls of /api/ps (t from the end of the last probe)\n")
            w.writelines(json.dumps(p) + "\n" for p in polls)
            w.write("\n== builder status\n" + "\n".join(got["status_text"]) + "\n")
            w.write("\n== /api/ps at the end\n" + json.dumps(ps, indent=1) + "\n")
            w.write("\n== serve log since the first probe (supervisor, GIN, scheduler)\n" + "\n".join(kept) + "\n")
            w.write("\n== every supervisor line\n" + "\n".join(sup_all) + "\n")
        hits = {k: sum(k in ln for ln in kept) for k in ("is being loaded again", "is no longer loaded; loading it again",
                                                          "does not list the model")}
        self.note(f"after probes: {hits}; ps at end {[(m.get('name'), m.get('size_vram')) for m in ps.get('models', [])] if isinstance(ps, dict) else ps}")


if __name__ == "__main__":
    Call5(run_cases.parse()).main()
