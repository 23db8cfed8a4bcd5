"""Issue 32's benchmark: a model on a slow network share, deployed three ways.

    python3 -m bench.model_cache                  # a 2 GB model behind 110 MB/s
    python3 -m bench.model_cache --size-gb 1 --dir /var/tmp/mc

The "share" is an ext4 file system on a loop device, reads and writes held
to 110 MB/s each way (1 GbE NFS) by the kernel's block throttle; it has hard
links, as NFS does, and the loop device counts every byte read and written.
Three procedures, one model, one share:

  1. seed: llama-gguf-split --merge the shards into a merged file on the
     share, a real `ollama serve` with its store on local disk, `ollama
     create` FROM the merged file, the first prompt;
  2. builder, no model cache: storage.local is the share (merged file and
     ollama's store on it), `builder up`, a prompt;
  3. builder, storage.model_cache on local disk, the share mounted read-only.

Each: the first deploy (up to and including the first answer) and a
restart (seed: ollama serve killed and started again; builder: `builder
down` then `builder up`), then the next answer. Page caches are dropped
before each timed phase (a machine that restarted, or whose page cache the
model no longer fits). Needs root, loop devices and cgroup v1 blkio. Only
loopback is used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench.benchmark import drop_caches  # noqa: E402
from builder.sample import write_split_model  # noqa: E402
from tests.fixtures.llama_cpp_release import llama_cpp_release_zip  # noqa: E402
from tests.helpers import free_port  # noqa: E402

MIB = 1 << 20
PROMPT = "Why is the sky blue?"
REAL_OLLAMA = Path("/work/ollama-real/ollama-0.5.7-linux-amd64.tgz")
WIDTH = 2048


def log(message: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class Share:
    """An emulated NFS share: an ext4 file system on a loop device whose reads
    and writes the kernel's block throttle (cgroup v1 blkio, root group: the
    flusher threads that write dirty pages back run there too) holds to
    `rate` bytes/s each way, as a full-duplex 1 GbE link does. Unlike a FUSE
    mount it has hard links, as NFS does. Bytes read from and written to the
    share are the loop device's own counters (/sys/block/loopN/stat: file
    data, metadata and the journal). While it is up the dirty-page limits are
    lowered (64 MiB, background 16 MiB) so that writers wait for the throttle,
    as an NFS close waits for its writes, instead of leaving gigabytes in the
    page cache for later; they are restored on exit."""

    BLKIO = Path("/sys/fs/cgroup/blkio")
    VM = Path("/proc/sys/vm")

    def __init__(self, work: Path, size: int, rate: int):
        self.work, self.size, self.rate = work, size, rate
        self.image = work / "share.img"
        self.mount = work / "share"  # the share, read-write (the seed; builder without a cache)
        self.read_only = work / "share-ro"  # a read-only bind of it (builder with a cache)
        self.device = ""
        self.majmin = ""
        self.saved_vm: dict[str, str] = {}

    @staticmethod
    def missing() -> str | None:
        if os.geteuid() != 0:
            return "run as root (loop devices, mounts, the block throttle, drop_caches)"
        if not (Share.BLKIO / "blkio.throttle.read_bps_device").exists():
            return f"no cgroup v1 blkio throttle at {Share.BLKIO} (this benchmark throttles the share's loop device there)"
        for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return None

    def __enter__(self) -> "Share":
        with open(self.image, "wb") as handle:
            handle.truncate(self.size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(self.image)],
                       check=True, timeout=300)
        self.device = subprocess.run(["losetup", "-f", "--show", str(self.image)], check=True, capture_output=True,
                                     text=True, timeout=60).stdout.strip()
        self.majmin = Path(f"/sys/block/{Path(self.device).name}/dev").read_text().strip()
        self.mount.mkdir(parents=True, exist_ok=True)
        self.read_only.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", self.device, str(self.mount)], check=True, timeout=60)
        subprocess.run(["mount", "--bind", str(self.mount), str(self.read_only)], check=True, timeout=60)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(self.read_only)], check=True, timeout=60)
        return self

    def throttle(self) -> None:
        for way in ("read", "write"):
            (self.BLKIO / f"blkio.throttle.{way}_bps_device").write_text(f"{self.majmin} {self.rate}\n")
        for name in ("dirty_bytes", "dirty_background_bytes", "dirty_ratio", "dirty_background_ratio"):
            self.saved_vm[name] = (self.VM / name).read_text().strip()
        (self.VM / "dirty_bytes").write_text(f"{64 * MIB}\n")
        (self.VM / "dirty_background_bytes").write_text(f"{16 * MIB}\n")

    def __exit__(self, *exc) -> None:
        for way in ("read", "write"):
            try:
                (self.BLKIO / f"blkio.throttle.{way}_bps_device").write_text(f"{self.majmin} 0\n")
            except OSError:
                pass
        # Writing one of a pair (bytes, ratio) zeroes the other: restore the one that was set.
        for ratio, size in (("dirty_ratio", "dirty_bytes"), ("dirty_background_ratio", "dirty_background_bytes")):
            if self.saved_vm:
                name = size if self.saved_vm[size] != "0" else ratio
                (self.VM / name).write_text(self.saved_vm[name] + "\n")
        for point in (self.read_only, self.mount):
            subprocess.run(["umount", str(point)], capture_output=True, timeout=120)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], capture_output=True, timeout=60)

    def mark(self) -> tuple[int, int]:
        fields = Path(f"/sys/block/{Path(self.device).name}/stat").read_text().split()
        return int(fields[2]) * 512, int(fields[6]) * 512

    def delta(self, before: tuple[int, int]) -> dict:
        """Bytes read from and written to the share since `before`, once the
        dirty pages written so far have reached it (a sync: timed apart)."""
        started = time.monotonic()
        os.sync()
        flush = time.monotonic() - started
        read, written = self.mark()
        return {"read": read - before[0], "written": written - before[1], "flush_s": flush}


def post(url: str, body: dict, timeout: float = 900) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    with opener.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def ask(url: str, model: str) -> dict:
    return post(f"{url}/api/generate", {"model": model, "prompt": PROMPT, "stream": False, "options": {"num_predict": 2}})


def wait_http(url: str, timeout: float = 60) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            opener.open(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers at {url}")
            time.sleep(0.1)


# ---------------------------------------------------------------- procedure 1


class Seed:
    """The seed's hand procedure, with a real ollama from the archive."""

    def __init__(self, work: Path, ollama_tgz: Path, gguf_split: Path, share_rw: Path):
        self.work = work / "seed"
        self.bin = self.work / "ollama"
        self.store = self.work / "dot-ollama" / "models"  # ~/.ollama/models: local disk
        self.share_rw = share_rw
        self.gguf_split = gguf_split
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: subprocess.Popen | None = None
        self.work.mkdir(parents=True)
        with tarfile.open(ollama_tgz) as archive:
            archive.extractall(self.bin)
        self.merged = share_rw / "seed" / "tiny-merged.gguf"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        return dict(env, OLLAMA_MODELS=str(self.store), OLLAMA_HOST=f"127.0.0.1:{self.port}", HOME=str(self.work),
                    NO_PROXY="127.0.0.1", OLLAMA_NOPRUNE="1")

    def serve(self) -> None:
        self.server = subprocess.Popen([str(self.bin / "bin" / "ollama"), "serve"], env=self.env(),
                                       stdout=open(self.work / "serve.log", "ab"), stderr=subprocess.STDOUT)
        wait_http(self.url + "/api/version")

    def kill(self) -> None:
        if self.server and self.server.poll() is None:
            self.server.send_signal(signal.SIGKILL)
            self.server.wait(timeout=30)
        # the runner is ollama's child: it dies with its parent's socket, make sure
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    argv = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if str(self.bin).encode() in argv and b"runner" in argv:
                    try:
                        os.kill(int(entry.name), signal.SIGKILL)
                    except OSError:
                        pass
        self.server = None

    def deploy(self) -> dict:
        self.merged.parent.mkdir(exist_ok=True)
        steps = {}
        started = time.monotonic()
        first = self.share_rw / "tiny" / "tiny-00001-of-00003.gguf"
        subprocess.run([str(self.gguf_split), "--merge", str(first), str(self.merged)], check=True, capture_output=True,
                       env=dict(os.environ, LD_LIBRARY_PATH=str(self.gguf_split.parent)))
        steps["merge"] = time.monotonic() - started
        self.serve()
        modelfile = self.work / "Modelfile"
        modelfile.write_text(f"FROM {self.merged}\nTEMPLATE \"{{{{ .Prompt }}}}\"\nPARAMETER num_ctx 512\n"
                             "PARAMETER temperature 0\nPARAMETER repeat_penalty 1\n")
        mark = time.monotonic()
        result = subprocess.run([str(self.bin / "bin" / "ollama"), "create", "tiny", "-f", str(modelfile)], env=self.env(),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ollama create failed: {result.stdout[-800:]} {result.stderr[-800:]}")
        steps["create"] = time.monotonic() - mark
        mark = time.monotonic()
        answer = ask(self.url, "tiny")
        steps["load+answer"] = time.monotonic() - mark
        return {"seconds": time.monotonic() - started, "steps": steps, "answer": answer.get("response")}

    def restart(self) -> dict:
        self.kill()
        drop_caches()
        started = time.monotonic()
        self.serve()
        answer = ask(self.url, "tiny")
        return {"seconds": time.monotonic() - started, "answer": answer.get("response")}


# --------------------------------------------------------- procedures 2 and 3


class Project:
    def __init__(self, root: Path, storage: Path, cache: Path | None, carried: Path):
        self.root = root
        self.carried = carried
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_") and "proxy" not in k.lower()}
        self.env.update(BUILDER_SERVE_PORT=str(self.port), BUILDER_CACHE_DIR=str(root / "cache"), NO_PROXY="127.0.0.1",
                        PYTHONPATH=str(REPO))
        self.run("init", "--preset", "tiny")
        config = root / "builder.yaml"
        data = yaml.safe_load(config.read_text())
        data["target"] = "host"
        data["host"] = {"prefix": str(root / "prefix")}
        data["storage"]["local"] = str(storage)
        if cache:
            data["storage"]["model_cache"] = str(cache)
        config.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        self.up_logs: list[str] = []

    def run(self, *args: str, check: bool = True, timeout: float = 3600) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "builder", *args], cwd=self.root, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"builder {' '.join(args)} failed ({result.returncode}): {result.stderr[-3000:]}")
        return result

    def up(self) -> dict:
        started = time.monotonic()
        result = self.run("up", "--offline", "--from", str(self.carried))
        up_s = time.monotonic() - started
        self.up_logs.append(result.stderr)
        answer = ask(self.url, "tiny")
        steps = {}
        for line in result.stderr.splitlines():
            line = line.strip()
            if ": done in " in line and line.endswith(" s"):
                name, _, took = line.partition(": done in ")
                steps[name] = float(took[:-2])
        return {"seconds": time.monotonic() - started, "up_s": up_s, "steps": steps, "answer": answer.get("response")}

    def down(self) -> None:
        self.run("down", check=False, timeout=120)


# ------------------------------------------------------------------ the run


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")), 0)
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, {mem / (1 << 20):.1f} GiB RAM, {platform.system()} {platform.release()}"


def read_all(path: Path) -> tuple[int, float]:
    started = time.monotonic()
    done = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(4 * MIB):
            done += len(chunk)
    return done, time.monotonic() - started


def fmt_mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def builder_row(project: Project, share: Share, label: str) -> dict:
    """`builder up` on a fresh download cache, then `down` and `up` again."""
    project.run("fetch", "--offline", "--from", str(project.carried))  # the download cache, untimed (the seed's archive is unpacked untimed too)
    log(f"{label}: first deploy")
    drop_caches()
    before = share.mark()
    first = project.up()
    first.update(share.delta(before))
    log(f"{label}: first deploy {first}")
    project.down()
    drop_caches()
    before = share.mark()
    again = project.up()
    again.update(share.delta(before))
    log(f"{label}: restart {again}")
    return {"first": first, "restart": again}


def clean_share(share: Path, shards: list[Path]) -> list[str]:
    """Remove what a procedure left on the share but the shards; say what was left."""
    keep = {f"tiny/{p.name}" for p in shards}
    left = sorted(str(p.relative_to(share)) for p in share.rglob("*") if p.is_file() and str(p.relative_to(share)) not in keep)
    for entry in share.iterdir():
        if entry.name == "lost+found":
            continue
        if entry.is_dir() and entry.name != "tiny":
            shutil.rmtree(entry)
        elif entry.is_file():
            entry.unlink()
    for entry in (share / "tiny").iterdir():
        if f"tiny/{entry.name}" not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    os.sync()
    return left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="model size in GB (default 2)")
    parser.add_argument("--rate-mb-s", type=float, default=110.0, help="the share's read and write rate, MB/s (default 110: 1 GbE)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/builder-model-cache-bench"), help="work folder (local disk; emptied)")
    parser.add_argument("--ollama-tgz", type=Path, default=REAL_OLLAMA, help="ollama 0.5.7 release archive (default: the real CPU build)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    problem = Share.missing()
    if problem:
        raise SystemExit(problem)
    began = time.monotonic()
    work: Path = args.dir.resolve()
    if work.exists():
        for point in (work / "share-ro", work / "share"):
            subprocess.run(["umount", str(point)], capture_output=True, timeout=120)
        shutil.rmtree(work)
    work.mkdir(parents=True)

    if args.ollama_tgz.is_file():
        ollama_tgz, which = args.ollama_tgz, f"real ollama 0.5.7 (CPU build from source: {args.ollama_tgz})"
    else:
        from tests.fixtures.ollama_release import ollama_release_tgz

        ollama_tgz = work / "double-ollama-linux-amd64.tgz"
        ollama_tgz.write_bytes(ollama_release_tgz())
        which = f"the ollama DOUBLE backed by real llama.cpp (tests/fixtures/ollama_release; {args.ollama_tgz} is missing)"
    carried = work / "carried"
    carried.mkdir()
    shutil.copyfile(ollama_tgz, carried / "ollama-linux-amd64.tgz")
    llama_zip = llama_cpp_release_zip()
    shutil.copyfile(llama_zip, carried / "llama-b4610-bin-ubuntu-x64.zip")
    tools = work / "llama.cpp"
    import zipfile

    with zipfile.ZipFile(llama_zip) as archive:
        archive.extractall(tools)
    gguf_split = tools / "build" / "bin" / "llama-gguf-split"
    gguf_split.chmod(0o755)

    # The model: F32 llama of WIDTH, 40 x WIDTH^2 bytes a block.
    per_block = 40 * WIDTH * WIDTH
    blocks = max(1, round((args.size_gb * 1e9 - 4.2e6) / per_block))
    rate = int(args.rate_mb_s * 1e6)

    rows: dict[str, dict] = {}
    notes: list[str] = []
    # The share holds the shards, a merged file and a store beside them (procedure 2): 2.5x the model and room.
    with Share(work, int(args.size_gb * 1e9 * 2.5) + (1 << 30), rate) as share:
        log(f"writing the model onto the share: {blocks} blocks of width {WIDTH}")
        shards = write_split_model(share.mount / "tiny", "tiny", 3, blocks=blocks, width=WIDTH, random=False)
        model_bytes = sum(p.stat().st_size for p in shards)
        probe_bytes = shards[1].stat().st_size
        os.sync()
        share.throttle()

        # The throttle, measured: one shard read cold, and one written.
        drop_caches()
        before = share.mark()
        size, seconds = read_all(share.read_only / "tiny" / shards[1].name)
        throttle_mb_s = size / seconds / 1e6
        counted = share.delta(before)["read"]
        started = time.monotonic()
        with open(share.mount / "write-probe", "wb") as handle:
            for _ in range(256):
                handle.write(bytes(MIB))
            handle.flush()
            os.fsync(handle.fileno())
        write_mb_s = 256 * MIB / (time.monotonic() - started) / 1e6
        (share.mount / "write-probe").unlink()
        log(f"throttle: read {size} bytes in {seconds:.1f} s = {throttle_mb_s:.1f} MB/s (the device counted {counted}); write {write_mb_s:.1f} MB/s")

        # 1. the seed's hand procedure
        seed = Seed(work, ollama_tgz, gguf_split, share.mount)
        try:
            log("seed: first deploy")
            drop_caches()
            before = share.mark()
            first = seed.deploy()
            first.update(share.delta(before))
            log(f"seed: first deploy {first}")
            before = share.mark()
            again = seed.restart()
            again.update(share.delta(before))
            log(f"seed: restart {again}")
            rows["1 seed (hand)"] = {"first": first, "restart": again}
        finally:
            seed.kill()
        clean_share(share.mount, shards)

        # 2. builder, storage.local the share, no model cache
        plain = Project(work / "builder-plain", share.mount, None, carried)
        try:
            rows["2 builder, no model cache"] = builder_row(plain, share, "builder without a model cache")
        finally:
            plain.down()
        left = clean_share(share.mount, shards)
        notes.append(f"2 left on the share (removed before 3): {', '.join(left) or 'nothing'}")

        # 3. builder with storage.model_cache on local disk, the share read-only
        cache = work / "model-cache"
        cached = Project(work / "builder-cache", share.read_only, cache, carried)
        try:
            rows["3 builder, model cache"] = builder_row(cached, share, "builder with a model cache")
        finally:
            cached.down()
        merged = cache / "tiny" / "tiny.gguf"
        drop_caches()
        size, seconds = read_all(merged)
        local_mb_s = size / seconds / 1e6
        (work / "builder-cache-up.log").write_text("\n=====\n".join(cached.up_logs))
        (work / "builder-plain-up.log").write_text("\n=====\n".join(plain.up_logs))

    # ---------------------------------------------------------------- report
    total = time.monotonic() - began
    out = print
    out("# issue 32: a model on a slow share, three procedures (bench/model_cache.py)")
    out(f"date       {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    out(f"machine    {machine()}")
    out(f"ollama     {which}")
    out("llama.cpp  b4610 tools from tests/fixtures/llama_cpp_release (compiled here); seed merges with llama-gguf-split --merge")
    out(f"model      {model_bytes} bytes ({model_bytes / 1e9:.2f} GB) in 3 shards: llama F32, {blocks} blocks, width {WIDTH}, constant weights")
    out(f"share      ext4 on a loop device, reads and writes each throttled to {rate} bytes/s by the blkio throttle (cgroup v1, root group);")
    out("           hard links work (as on NFS); procedure 3 sees it through a read-only bind mount; dirty-page limit 64 MiB while it runs")
    out(f"throttle   measured: read {throttle_mb_s:.1f} MB/s (one shard, {probe_bytes} bytes, cold), write {write_mb_s:.1f} MB/s (256 MiB + fsync)")
    out(f"local disk {local_mb_s:.0f} MB/s (the model cache's merged file read after drop_caches)")
    out("restart    seed: ollama serve killed (SIGKILL) and started again, then a prompt; builder: `builder down` then `builder up`, then a prompt")
    out("caches     page caches dropped (echo 3 > /proc/sys/vm/drop_caches) before each timed phase")
    out("prompt     POST /api/generate, num_predict 2; the first answer ends each timed phase")
    out("")
    header = f"{'procedure':<28}{'first deploy s':>15}{'MB read':>10}{'MB written':>12}{'restart s':>11}{'MB read':>10}"
    out(header)
    out("-" * len(header))
    for name, row in rows.items():
        f, r = row["first"], row["restart"]
        out(f"{name:<28}{f['seconds']:>15.1f}{fmt_mb(f['read']):>10}{fmt_mb(f['written']):>12}{r['seconds']:>11.1f}{fmt_mb(r['read']):>10}")
    out("")
    out("MB = 10^6 bytes read from / written to the share, as the loop device counts them (file data, metadata, journal).")
    out("Writes still in the page cache at the answer (at most the 64 MiB dirty limit) are synced after it: 'flush' in the details.")
    out("")
    out("details")
    for name, row in rows.items():
        for phase in ("first", "restart"):
            d = row[phase]
            extra = ", ".join(f"{k} {v:.1f} s" for k, v in d.get("steps", {}).items())
            out(f"  {name}, {phase}: {d['seconds']:.1f} s" + (f" (up {d['up_s']:.1f} s)" if "up_s" in d else "")
                + (f"; steps: {extra}" if extra else "")
                + f"; read {d['read']} written {d['written']} bytes; flush after the answer {d['flush_s']:.1f} s; answer {d['answer']!r}")
    for log_text in plain.up_logs[:1]:
        for line in log_text.splitlines():
            if "create: blob" in line or "not linked" in line:
                out(f"  2's create: {line.strip()}")
    for note in notes:
        out(f"  note: {note}")
    out("")
    cache_row, seed_row, plain_row = rows["3 builder, model cache"], rows["1 seed (hand)"], rows["2 builder, no model cache"]
    r = cache_row["restart"]
    share_s = model_bytes / (throttle_mb_s * 1e6)
    local_s = model_bytes / (local_mb_s * 1e6)
    out(f"{'PASS' if r['read'] < 64 * 1024 else 'FAIL'}  a restart with the model cache reads no file on the share "
        f"(under 64 KiB: the file system's metadata for the shards' stat): {r['read']} bytes")
    out(f"{'PASS' if r['seconds'] < share_s else 'FAIL'}  that restart is bounded by local disk: {r['seconds']:.1f} s, reading the model from local disk "
        f"takes {local_s:.1f} s, from the share {share_s:.1f} s")
    a, b = cache_row["first"]["seconds"], seed_row["first"]["seconds"]
    out(f"{'PASS' if a <= b else 'FAIL'}  builder with a model cache deploys first no slower than the seed: {a:.1f} s vs {b:.1f} s ({a / b:.2f}x)")
    p = plain_row["restart"]
    out(f"info  without a model cache a restart reads the model from the share again: {p['read'] / 1e6:.0f} MB in {p['seconds']:.1f} s "
        f"(with one: {r['read'] / 1e6:.2f} MB in {r['seconds']:.1f} s)")
    out(f"took {total:.0f} s in all")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
