#!/usr/bin/env python3
"""run_cases.py: builder's host target on a real GPU, one row per case.

Runs ON THE GPU MACHINE (any NVIDIA host), from the repository root, after
device_setup.sh (which builds the CUDA ollama 0.5.7 archive and the model):

    export PYTHONPATH=/tmp/site:$PWD   # carried wheels + this checkout's builder
    python3 bench/gpu/run_cases.py --work WORK --out DIR --cards 16 24 --ctx 2048 8192 \\
        [--gib-override] [--oom-case 24:2048] [--deadline SECONDS]

Needs: nvidia-smi, python3 with torch (hold_gpu.py), WORK/carried (the two
release archives), WORK/models/r1-14b (make_r1_model.py).

For each emulated card (hold_gpu.py holds all but CARD GiB of GPU 0) and
each num_ctx: writes WORK/cfg/builder.yaml (target host, storage.local at the
shards, num_gpu auto, gpus [0]; with --gib-override also
plan.gpu_memory_gib [CARD]), runs `builder plan`, `builder up --offline
--from WORK/carried` (timed), one generate (tokens/s from ollama's
eval_count / eval_duration), `builder status`, /api/ps, ollama's log lines
about offload and buffers, nvidia-smi; then searches upward from the planned
num_gpu through ollama's API (options.num_gpu, num_predict 1) for the
largest that loads and the smallest that fails; then `builder down`.
--oom-case CARD:CTX adds a case with num_gpu set to one above the largest
that loaded for that card and ctx: `up`'s out-of-memory line, and whether
serve stays up.

Writes DIR/results.json (rewritten after every case), DIR/raw.txt (every
command's output), DIR/serve-log.txt (the matching lines of ollama's log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = "r1:iq1_m"
PORT = 11434
LOG_PATTERNS = re.compile(
    r"offload|offloaded|buffer size|KV self size|compute buffer|llama runner started|out of memory|"
    r"cudaMalloc|failed to allocate|unable to allocate|error loading model|inference compute|library=cuda|"
    r"memory\.required|layers\.|CUDA_VISIBLE|n_gpu_layers|--n-gpu-layers|ggml_cuda_init|Device 0|"
    r"llama_new_context|llm_load_tensors|terminated|panic|starting llama server",
    re.I,
)
T0 = time.time()


class Run:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.raw = open(self.out / "raw.txt", "a", buffering=1)
        self.logf = open(self.out / "serve-log.txt", "a", buffering=1)
        self.cfg = self.work / "cfg" / "builder.yaml"
        self.prefix = self.work / "prefix"
        self.serve_log = self.prefix / "run" / "serve.log"
        self.rows: list[dict] = []
        self.holder: subprocess.Popen | None = None

    # -- helpers -------------------------------------------------------------
    def note(self, text: str) -> None:
        line = f"[{time.time() - T0:7.1f}s] {text}"
        print(line, flush=True)
        self.raw.write(line + "\n")

    def sh(self, title: str, cmd: list[str], timeout: float = 900) -> tuple[int, str, float]:
        start = time.time()
        try:
            # builder runs from BENCH_BUILDER_ROOT (default: this checkout), `python -m builder` importing from there
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=self.env,
                               cwd=os.environ.get("BENCH_BUILDER_ROOT", str(REPO)))
            rc, text = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:
            rc, text = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        secs = time.time() - start
        self.raw.write(f"\n===== {title}: {' '.join(cmd)} (rc {rc}, {secs:.1f} s)\n{text}\n")
        self.note(f"{title}: rc {rc} in {secs:.1f} s")
        return rc, text, secs

    def builder(self, title: str, *argv: str, timeout: float = 900) -> tuple[int, str, float]:
        return self.sh(title, [sys.executable, "-m", "builder", *argv], timeout)

    def smi(self) -> dict:
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total,memory.used,memory.free", "--format=csv,noheader,nounits"],
            stdout=subprocess.PIPE, text=True,
        ).stdout.strip().splitlines()[0]
        total, used, free = (int(x) for x in q.split(","))
        apps = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
            stdout=subprocess.PIPE, text=True,
        ).stdout.strip()
        return {"total_mib": total, "used_mib": used, "free_mib": free, "apps": apps}

    def api(self, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict | str, float]:
        start = time.time()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode()
                code = r.status
        except urllib.error.HTTPError as e:
            code, text = e.code, e.read().decode()
        except Exception as e:  # connection refused, timeout
            code, text = 0, f"{type(e).__name__}: {e}"
        secs = time.time() - start
        try:
            parsed: dict | str = json.loads(text)
        except ValueError:
            parsed = text
        self.raw.write(f"\n===== API {path} {json.dumps(body)} -> {code} in {secs:.1f} s\n{text[:4000]}\n")
        return code, parsed, secs

    def log_offset(self) -> int:
        try:
            return self.serve_log.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int, title: str) -> list[str]:
        try:
            with open(self.serve_log, "rb") as f:
                if f.seek(0, 2) < offset:
                    offset = 0  # rotated
                f.seek(offset)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        keep = [ln for ln in lines if LOG_PATTERNS.search(ln)]
        self.logf.write(f"\n===== {title}\n" + "\n".join(keep) + "\n")
        return keep

    def serve_env(self) -> dict:
        """CUDA_VISIBLE_DEVICES and friends of the running `ollama serve`."""
        found = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if len(cmd) > 1 and cmd[0].endswith(b"ollama") and cmd[1] == b"serve":
                    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
                    found = {k: env.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OLLAMA_HOST", "OLLAMA_NUM_PARALLEL", "OLLAMA_LOAD_TIMEOUT", "LD_LIBRARY_PATH")}
                    found["pid"] = int(pid)
            except OSError:
                continue
        return found

    def capture(self, title: str) -> dict:
        """`builder status` (text and --json), nvidia-smi's per-process rows
        (pid, gpu_uuid, used_memory) as builder reads them, and each runner's
        /proc/PID/cmdline, for comparing status/up with the real GPU."""
        _, text, _ = self.builder(f"status {title}", "status", "-c", str(self.cfg), "--target", "host")
        _, js, _ = self.builder(f"status --json {title}", "status", "-c", str(self.cfg), "--target", "host", "--json")
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
        runners = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv and argv[0].endswith(b"ollama_llama_server") or b"runner" in argv[1:2]:
                    runners[pid] = " ".join(a.decode(errors="replace") for a in argv if a)
        self.raw.write(f"\n===== nvidia-smi compute-apps {title}\n{apps}\n===== runner cmdlines {title}\n{json.dumps(runners, indent=1)}\n")
        return {"status_text": text.strip().splitlines(), "status_json": js, "apps_raw": apps.strip().splitlines(), "runners": runners}

    # -- the card ------------------------------------------------------------
    def hold(self, card: float) -> dict:
        self.release()
        if self.args.no_hold:
            return self.smi()
        log = open(self.out / f"hold-{card:g}.log", "w")
        self.holder = subprocess.Popen([sys.executable, str(REPO / "bench/gpu/hold_gpu.py"), "--leave-gib", str(card)],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(240):
            time.sleep(0.5)
            text = (self.out / f"hold-{card:g}.log").read_text()
            if "holding" in text:
                break
            if self.holder.poll() is not None:
                raise SystemExit(f"hold_gpu.py ended: {text}")
        self.note("hold: " + text.strip().replace("\n", " | "))
        return self.smi()

    def release(self) -> None:
        if self.holder and self.holder.poll() is None:
            os.killpg(self.holder.pid, signal.SIGTERM)
            self.holder.wait(30)
        self.holder = None

    # -- config ----------------------------------------------------------------
    def write_config(self, card: float, ctx: int, num_gpu: str | int, override: bool | None = None) -> None:
        self.cfg.parent.mkdir(parents=True, exist_ok=True)
        override = self.args.gib_override if override is None else override
        plan = f"plan:\n  gpu_memory_gib: [{card:g}]\n" if override else ""
        self.cfg.write_text(
            f"""version: 1
project: gpubench
target: host
host:
  prefix: {self.prefix}
cache_dir: {self.work / 'cache'}
model:
  name: {MODEL}
  shards: r1-{self.args.blocks}b/r1-{self.args.blocks}b-00001-of-00003.gguf
  parameters:
    num_gpu: {num_gpu}
    num_ctx: {ctx}
    temperature: 0
  template: "<｜User｜>{{{{ .Prompt }}}}<｜Assistant｜>"
storage:
  local: {self.work / 'models'}
gpus: [0]
{plan}serve:
  port: {PORT}
  bind: 127.0.0.1
"""
        )
        self.raw.write(f"\n===== {self.cfg}\n{self.cfg.read_text()}\n")

    # -- one case --------------------------------------------------------------
    def load_probe(self, n: int, ctx: int) -> dict:
        off = self.log_offset()
        code, body, secs = self.api("/api/generate", {
            "model": MODEL, "prompt": "hi", "stream": False,
            "options": {"num_gpu": n, "num_ctx": ctx, "num_predict": 1, "temperature": 0},
        })
        smi = self.smi()
        lines = self.log_since(off, f"probe num_gpu={n} ctx={ctx}")
        err = body.get("error") if isinstance(body, dict) else str(body)
        ok = code == 200 and isinstance(body, dict) and not err
        _, ps, _ = self.api("/api/ps")
        vram = next((m.get("size_vram") for m in ps.get("models", [])), None) if isinstance(ps, dict) else None
        r = {"num_gpu": n, "ok": ok, "http": code, "error": err, "seconds": round(secs, 1),
             "used_mib": smi["used_mib"], "size_vram": vram,
             "log": [ln for ln in lines if re.search(r"offloaded|CUDA0 .*buffer size|KV self size|out of memory|alloc|error|started in", ln, re.I)][-14:]}
        self.note(f"probe num_gpu {n}: {'loads' if ok else 'FAILS'} ({secs:.1f} s, used {smi['used_mib']} MiB) {'' if ok else str(err)[:300]}")
        return r

    def case(self, card: float, ctx: int, base_used: int) -> dict:
        row: dict = {"card_gib": card, "num_ctx": ctx, "gib_override": self.args.gib_override}
        # what builder plans from the GPU as it finds it (no plan.gpu_memory_gib), for the record
        self.write_config(card, ctx, "auto", override=False)
        rc, text, _ = self.builder(f"plan (GPU as found) card {card:g} ctx {ctx}", "plan", "-c", str(self.cfg))
        row["plan_as_found"] = [ln for ln in text.splitlines() if ln.startswith(("gpu ", "num_gpu", "memory"))]
        self.write_config(card, ctx, "auto")
        rc, text, _ = self.builder(f"plan card {card:g} ctx {ctx}", "plan", "-c", str(self.cfg))
        m = re.search(r"num_gpu (\d+) of (\d+) layers", text)
        row["planned"] = int(m[1]) if m else None
        row["layers"] = int(m[2]) if m else None
        row["plan_lines"] = [ln for ln in text.splitlines() if ln.startswith(("gpu ", "num_gpu", "memory"))]
        off = self.log_offset()
        rc, text, secs = self.builder(f"up card {card:g} ctx {ctx}", "up", "-c", str(self.cfg), "--target", "host",
                                      "--offline", "--from", str(self.work / "carried"))
        row["up_rc"], row["up_seconds"] = rc, round(secs, 1)
        row["up_tail"] = text.strip().splitlines()[-8:]
        row_up_text = text
        code, ver, _ = self.api("/api/version")
        row["ollama_version"] = ver.get("version") if isinstance(ver, dict) else None
        row["serve_env"] = self.serve_env()
        smi = self.smi()
        row["used_mib_after_up"] = smi["used_mib"]
        row["ollama_used_mib"] = smi["used_mib"] - base_used
        row["apps"] = smi["apps"]
        lines = self.log_since(off, f"up card {card:g} ctx {ctx}")
        row["log"] = [ln for ln in lines if re.search(r"offloaded|buffer size|KV self size|memory\.required|layers\.|started in|out of memory|library=cuda|inference compute", ln, re.I)][-30:]
        started = [float(x) for x in re.findall(r"llama runner started in ([\d.]+) seconds", "\n".join(lines))]
        row["runner_start_seconds"] = started[-1] if started else None
        # one generate
        code, body, secs = self.api("/api/generate", {"model": MODEL, "prompt": "Why is the sky blue?", "stream": False,
                                                     "options": {"num_predict": 24}})  # under 0.5.7's 30-repeat abort (zero weights repeat one token)
        if isinstance(body, dict) and body.get("eval_duration"):
            row["tokens_per_s"] = round(body["eval_count"] / body["eval_duration"] * 1e9, 2)
            row["eval_count"] = body["eval_count"]
            row["load_duration_s"] = round(body.get("load_duration", 0) / 1e9, 2)
        else:
            row["generate_error"] = str(body)[:500]
        rc, text, _ = self.builder(f"status card {card:g} ctx {ctx}", "status", "-c", str(self.cfg), "--target", "host")
        row["status"] = [ln for ln in text.splitlines() if re.search(r"load|gpu|GPU|share|running|restarts", ln)][:8]
        row["up_output"] = row_up_text.strip().splitlines()
        row["capture"] = self.capture(f"card {card:g} ctx {ctx}")
        code, ps, _ = self.api("/api/ps")
        if isinstance(ps, dict) and ps.get("models"):
            m0 = ps["models"][0]
            row["ps_size"], row["ps_size_vram"] = m0.get("size"), m0.get("size_vram")
        self.note(f"case card {card:g} ctx {ctx}: planned {row['planned']}, up rc {row['up_rc']} in {row['up_seconds']} s, "
                  f"{row.get('tokens_per_s')} tok/s, used {row['ollama_used_mib']} MiB by ollama")
        # search upward from the plan
        probes = []
        start = row["planned"] if row["planned"] is not None else 0
        if self.args.no_search:
            probes.append({"num_gpu": start, "ok": row["up_rc"] == 0, "by": "up"})
        elif row["up_rc"] != 0:
            # the plan did not load: walk down
            n = start
            while n >= 0 and self.time_left() > 75:
                r = self.load_probe(n, ctx)
                probes.append(r)
                if r["ok"]:
                    break
                n -= 1
        else:
            probes.append({"num_gpu": start, "ok": True, "by": "up"})
            n = start + 1
            top = (row["layers"] or 14) + 1
            while n <= top and self.time_left() > 75:
                r = self.load_probe(n, ctx)
                probes.append(r)
                if not r["ok"]:
                    break
                n += 1
        row["probes"] = probes
        oks = [p["num_gpu"] for p in probes if p["ok"]]
        fails = [p["num_gpu"] for p in probes if not p["ok"]]
        row["largest_loads"] = max(oks) if oks else None
        row["smallest_fails"] = min(f for f in fails if not oks or f > max(oks)) if [f for f in fails if not oks or f > max(oks)] else None
        best = next((p for p in probes if p.get("num_gpu") == row["largest_loads"] and "used_mib" in p), None)
        row["used_mib_at_largest"] = (best["used_mib"] - base_used) if best else None
        self.builder(f"down card {card:g} ctx {ctx}", "down", "-c", str(self.cfg), "--target", "host", timeout=120)
        return row

    def oom_case(self, card: float, ctx: int, n: int, base_used: int) -> dict:
        row: dict = {"card_gib": card, "num_ctx": ctx, "oom_case": True, "num_gpu": n}
        self.write_config(card, ctx, n)
        off = self.log_offset()
        rc, text, secs = self.builder(f"up OOM card {card:g} ctx {ctx} num_gpu {n}", "up", "-c", str(self.cfg), "--target", "host",
                                      "--offline", "--from", str(self.work / "carried"))
        row["up_rc"], row["up_seconds"], row["up_output"] = rc, round(secs, 1), text.strip().splitlines()[-15:]
        time.sleep(3)
        rc2, text2, _ = self.builder("status after OOM", "status", "-c", str(self.cfg), "--target", "host")
        row["status_after"] = text2.strip().splitlines()[:12]
        row["up_output_all"] = text.strip().splitlines()
        row["capture"] = self.capture("after OOM")
        code, ver, _ = self.api("/api/version")
        row["serve_answers_after"] = code == 200
        row["log"] = [ln for ln in self.log_since(off, f"OOM case num_gpu {n}") if re.search(r"out of memory|alloc|error|offloaded|buffer size|terminated", ln, re.I)][-20:]
        self.note(f"OOM case: up rc {rc}, serve answers after: {row['serve_answers_after']}")
        self.builder("down OOM case", "down", "-c", str(self.cfg), "--target", "host", timeout=120)
        return row

    def time_left(self) -> float:
        if self.args.end_epoch:
            return self.args.end_epoch - time.time()
        return self.args.deadline - (time.time() - T0)

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=1, default=str))

    def main(self) -> None:
        self.env = dict(os.environ, BUILDER_CACHE_DIR=str(self.work / "cache"))
        self.note(f"GPU before anything: {self.smi()}")
        oom = None
        if self.args.oom_case:
            c, x = self.args.oom_case.split(":")
            oom = (float(c), int(x))
        try:
            for card in self.args.cards:
                if self.time_left() < 170:
                    self.note(f"skipping card {card:g}: {self.time_left():.0f} s left")
                    break
                smi = self.hold(card)
                self.note(f"GPU with the hold: {smi}")
                base = smi["used_mib"]
                for ctx in self.args.ctx:
                    if self.time_left() < 150:
                        self.note(f"skipping card {card:g} ctx {ctx}: {self.time_left():.0f} s left")
                        continue
                    row = self.case(card, ctx, base)
                    row["hold"] = smi
                    self.rows.append(row)
                    self.save()
                    if oom == (card, ctx) and row.get("largest_loads") is not None and self.time_left() > 90:
                        self.rows.append(self.oom_case(card, ctx, row["largest_loads"] + 1, base))
                        self.save()
        finally:
            self.builder("down (final)", "down", "-c", str(self.cfg), "--target", "host", timeout=120)
            self.release()
            self.note(f"GPU at the end: {self.smi()}")
            self.save()


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cards", type=float, nargs="+", default=[16, 24])
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--gib-override", action="store_true", help="plan.gpu_memory_gib: [CARD] in the config")
    ap.add_argument("--oom-case", default=None, help="CARD:CTX")
    ap.add_argument("--blocks", type=int, default=14, help="the model make_r1_model.py wrote: WORK/models/r1-<blocks>b")
    ap.add_argument("--no-search", action="store_true", help="no probes: the plan that `up` loaded counts as the largest that loads")
    ap.add_argument("--no-hold", action="store_true", help="no card emulation (a dry run)")
    ap.add_argument("--end-epoch", type=float, default=0, help="wall-clock end (epoch seconds); wins over --deadline")
    ap.add_argument("--deadline", type=float, default=3600, help="seconds from start; no new case or probe after")
    return ap.parse_args()


if __name__ == "__main__":
    Run(parse()).main()
