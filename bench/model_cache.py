"""Issue 32's benchmark: a model on a slow network share, deployed three ways.

    python3 -m bench.model_cache                  # a 2 GB model behind 105 MiB/s
    python3 -m bench.model_cache --size-gb 1 --dir /var/tmp/mc

The "share" is a local folder served through rclone FUSE mounts limited to
105 MiB/s (110 MB/s, 1 GbE NFS): a read-only mount (tests/fixtures/
throttle.py, exact read counting) and a read-write one (defined here:
--vfs-cache-mode writes, for the procedures that write to the share). Bytes
read from the share are what the rclone process serving the mount read
(its /proc/PID/io rchar), bytes written are what landed in the share's
folder. Three procedures, one model, one throttle:

  1. seed: llama-gguf-split --merge the shards into a merged file on the
     share, a real `ollama serve` with its store on local disk, `ollama
     create` FROM the merged file, the first prompt;
  2. builder, no model cache: storage.local is the read-write view of the
     share (merged file and ollama's store on it), `builder up`, a prompt;
  3. builder, storage.model_cache on local disk, the share read-only.

Each: the first deploy (up to and including the first answer) and a
restart (seed: ollama serve killed and started again; builder: `builder
down` then `builder up`), then the next answer. Page caches are dropped
before each timed phase. Needs root, rclone, fuse3. Only loopback is used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench.benchmark import drop_caches  # noqa: E402
from builder.sample import write_split_model  # noqa: E402
from tests.fixtures.llama_cpp_release import llama_cpp_release_zip  # noqa: E402
from tests.fixtures.throttle import missing, rclone_io  # noqa: E402
from tests.helpers import free_port  # noqa: E402

MIB = 1 << 20
PROMPT = "Why is the sky blue?"
REAL_OLLAMA = Path("/work/ollama-real/ollama-0.5.7-linux-amd64.tgz")
WIDTH = 2048


def log(message: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


@contextmanager
def share_mount(source: Path, mount_point: Path, rate: str, log_file: Path, write: bool) -> Iterator[Path]:
    """`source` at `mount_point` through rclone, reads (and uploads) limited to
    `rate`. tests/fixtures/throttle.py's `throttled(..., exact=True)` plus
    --no-checksum: without it rclone reads each file a second time, from the
    source folder at local-disk speed, when a client has read it whole (its
    hash check at close), which doubles rclone's read count on a first read
    and adds that time. `write`: read-write, --vfs-cache-mode writes (writes go
    to rclone's cache on local disk and are uploaded from there once the file
    is closed, --vfs-write-back 0s): llama-gguf-split seeks back to write its
    header and ollama opens blobs O_RDWR, which rclone serves only from its
    cache. Read-only otherwise (--vfs-cache-mode off)."""
    assert missing() is None, missing()
    mount_point.mkdir(parents=True, exist_ok=True)
    config = log_file.with_suffix(".conf")
    config.write_text("")
    mode = (["--vfs-cache-mode", "writes", "--vfs-write-back", "0s", "--cache-dir", str(log_file.with_suffix(".cache"))] if write
            else ["--read-only", "--vfs-cache-mode", "off"])
    subprocess.run(
        ["rclone", "mount", str(source), str(mount_point), *mode, "--bwlimit", rate, "--buffer-size", "0", "--no-checksum",
         "--allow-other", "--daemon", "--config", str(config), "--log-file", str(log_file)],
        check=True, timeout=60,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mount_point):
            if time.monotonic() > deadline:
                raise RuntimeError(f"rclone did not mount {mount_point}")
            time.sleep(0.1)
        yield mount_point
    finally:
        unmount(mount_point)


def unmount(mount_point: Path) -> None:
    for attempt in range(50):
        if not os.path.ismount(mount_point):
            return
        subprocess.run(["fusermount3", "-u" if attempt < 40 else "-uz", str(mount_point)], capture_output=True, timeout=30)
        time.sleep(0.2)


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def drain(source: Path, cache: Path, quiet_s: float = 4.0, limit_s: float = 600.0) -> float:
    """Wait until rclone's uploads into `source` have stopped (its size
    unchanged for `quiet_s` and no upload in flight in the log): seconds waited."""
    started = time.monotonic()
    last, since = tree_bytes(source), time.monotonic()
    while time.monotonic() - started < limit_s:
        time.sleep(0.5)
        now = tree_bytes(source)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return time.monotonic() - started - quiet_s


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


class Share:
    """Byte counters of the share: reads and writes through one mount."""

    def __init__(self, mount: Path, source: Path, rw: bool):
        self.mount, self.source, self.rw = mount, source, rw

    def mark(self) -> tuple[int, int, int]:
        rchar, wchar = rclone_io(self.mount)
        return rchar, wchar, tree_bytes(self.source)

    def delta(self, before: tuple[int, int, int], written: int | None = None) -> dict:
        """Bytes read from and written to the share since `before`. On the
        read-write mount rclone's rchar also counts the bytes clients write
        (it reads them from /dev/fuse) and its upload's read of its cache
        file: read = rchar - 2 x written, written = what landed in the share's
        folder (net)."""
        rchar, wchar, size = self.mark()
        written = max(0, size - before[2]) if written is None else written
        read = rchar - before[0]
        if self.rw:
            read = max(0, read - 2 * written)
        return {"read": read, "written": written, "rchar": rchar - before[0], "wchar": wchar - before[1]}


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


NO_LINKS = """\
# Written by bench/model_cache.py: rclone's FUSE mount has no hard links and
# answers link() with EIO, which builder's create does not take for "cannot
# link" (it stops). EPERM, which it does take, for paths under the share.
import errno, os
_link = os.link
def _bench_link(src, dst, *args, **kwargs):
    for path in (src, dst):
        if os.path.abspath(os.fspath(path)).startswith(%r + "/"):
            raise OSError(errno.EPERM, "Operation not permitted (bench: the rclone share has no hard links; rclone says EIO)")
    return _link(src, dst, *args, **kwargs)
os.link = _bench_link
"""


class Project:
    def __init__(self, root: Path, storage: Path, cache: Path | None, carried: Path, no_links: bool = False):
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
        if no_links:  # the supervisor runs with HOME=PREFIX/run/home: its user site
            site = root / "prefix" / "run" / "home" / ".local" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
            site.mkdir(parents=True)
            (site / "usercustomize.py").write_text(NO_LINKS % str(storage))
            self.shim = site / "usercustomize.py"

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="model size in GB (default 2)")
    parser.add_argument("--rate", default="105M", help="rclone --bwlimit (default 105M: 105 MiB/s = 110 MB/s)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/builder-model-cache-bench"), help="work folder (local disk; emptied)")
    parser.add_argument("--ollama-tgz", type=Path, default=REAL_OLLAMA, help="ollama 0.5.7 release archive (default: the real CPU build)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    if os.geteuid() != 0:
        raise SystemExit("run as root (drop_caches, FUSE mounts with allow_other)")
    if missing():
        raise SystemExit(missing())
    began = time.monotonic()
    work: Path = args.dir.resolve()
    if work.exists():
        for mount in (work / "share-ro", work / "share-rw"):
            unmount(mount)
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
    source = work / "share-source"  # the NFS server's folder
    log(f"writing the model: {blocks} blocks of width {WIDTH}")
    shards = write_split_model(source / "tiny", "tiny", 3, blocks=blocks, width=WIDTH, random=False)
    model_bytes = sum(p.stat().st_size for p in shards)

    rows: dict[str, dict] = {}
    notes: list[str] = []
    with ExitStack() as stack:
        ro = stack.enter_context(share_mount(source, (work / "share-ro").resolve(), args.rate, work / "rclone-ro.log", write=False))
        rw = stack.enter_context(share_mount(source, (work / "share-rw").resolve(), args.rate, work / "rclone-rw.log", write=True))
        share_ro, share_rw = Share(ro, source, rw=False), Share(rw, source, rw=True)

        # The throttle, measured: one shard read through the read-only mount.
        drop_caches()
        before = share_ro.mark()
        size, seconds = read_all(ro / "tiny" / shards[1].name)
        throttle_mb_s = size / seconds / 1e6
        log(f"throttle: {size} bytes in {seconds:.1f} s = {throttle_mb_s:.1f} MB/s (rclone read {share_ro.delta(before)['read']})")

        # 1. the seed's hand procedure
        seed = Seed(work, ollama_tgz, gguf_split, rw)
        try:
            log("seed: first deploy")
            drop_caches()
            before = share_rw.mark()
            first = seed.deploy()
            wrote = drain(source, work / "rclone-rw.cache")
            first.update(share_rw.delta(before), drain_s=wrote)
            log(f"seed: first deploy {first}")
            before = share_rw.mark()
            again = seed.restart()
            again.update(share_rw.delta(before, written=0))
            log(f"seed: restart {again}")
            rows["1 seed (hand)"] = {"first": first, "restart": again}
        finally:
            seed.kill()
        shutil.rmtree(rw / "seed", ignore_errors=True)
        drain(source, work / "rclone-rw.cache")

        # 2. builder, storage.local the read-write share, no model cache
        plain = Project(work / "builder-plain", rw, None, carried, no_links=True)
        try:
            plain.run("fetch", "--offline", "--from", str(carried))  # the download cache, untimed (the seed's archive is unpacked untimed too)
            log("builder without a model cache: first deploy")
            drop_caches()
            before = share_rw.mark()
            first = plain.up()
            wrote = drain(source, work / "rclone-rw.cache")
            first.update(share_rw.delta(before), drain_s=wrote)
            log(f"builder without cache: first deploy {first}")
            plain.down()
            drop_caches()
            before = share_rw.mark()
            again = plain.up()
            again.update(share_rw.delta(before, written=None))
            log(f"builder without cache: restart {again}")
            rows["2 builder, no model cache"] = {"first": first, "restart": again}
        except RuntimeError as exc:  # the read-write rclone mount is the weak part of the emulation: go on with 3
            rows["2 builder, no model cache"] = {"error": " ".join(str(exc).split())[-700:]}
            log(f"builder without cache FAILED: {exc}")
        finally:
            plain.down()
        for leftover in (rw / "tiny" / "tiny.gguf", rw / "ollama"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists():
                leftover.unlink()
        for extra in [*(rw / "tiny").glob("tiny.gguf*"), *(rw / "tiny").glob(".tiny.gguf*")]:
            extra.unlink()
        drain(source, work / "rclone-rw.cache")
        left = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
        if left != sorted(f"tiny/{p.name}" for p in shards):
            notes.append(f"the share still holds, before procedure 3: {left}")

        # 3. builder with storage.model_cache on local disk, the share read-only
        cache = work / "model-cache"
        cached = Project(work / "builder-cache", ro, cache, carried)
        try:
            cached.run("fetch", "--offline", "--from", str(carried))
            log("builder with a model cache: first deploy")
            drop_caches()
            before = share_ro.mark()
            first = cached.up()
            first.update(share_ro.delta(before, written=0))
            log(f"builder with cache: first deploy {first}")
            cached.down()
            drop_caches()
            before = share_ro.mark()
            again = cached.up()
            again.update(share_ro.delta(before, written=0))
            log(f"builder with cache: restart {again}")
            rows["3 builder, model cache"] = {"first": first, "restart": again}
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
    out(f"llama.cpp  b4610 tools from tests/fixtures/llama_cpp_release (compiled here); seed merges with llama-gguf-split --merge")
    out(f"model      {model_bytes} bytes ({model_bytes / 1e9:.2f} GB) in 3 shards: llama F32, {blocks} blocks, width {WIDTH}, constant weights")
    out(f"share      rclone FUSE mounts of {source} --bwlimit {args.rate}: read-only (--vfs-cache-mode off, --buffer-size 0)"
        " for procedure 3; read-write (--vfs-cache-mode writes, --vfs-write-back 0s) for 1 and 2")
    out("           (throttle.py's mount plus --no-checksum: without it rclone re-reads each file whole read, from its source at disk speed, for a hash check)")
    out("links      rclone's FUSE mount answers link() with EIO, which builder's create does not take for 'cannot link': it stops (see the report);")
    out("           for procedure 2 a usercustomize.py in the supervisor's HOME turns that into EPERM for paths under the share, so create")
    out("           uploads the merged file to ollama, which writes its blob on the share (what builder does on a share without hard links;")
    out("           on a real NFS share the link works and that copy, S read + S written, is not made)")
    out(f"throttle   measured {throttle_mb_s:.1f} MB/s (one shard, {shards[1].stat().st_size} bytes, read through the read-only mount after drop_caches)")
    out(f"local disk {local_mb_s:.0f} MB/s (the model cache's merged file read after drop_caches)")
    out("restart    seed: ollama serve killed (SIGKILL) and started again, then a prompt; builder: `builder down` then `builder up`, then a prompt")
    out("caches     page caches dropped (echo 3 > /proc/sys/vm/drop_caches) before each timed phase")
    out("prompt     POST /api/generate, num_predict 2; the first answer ends each timed phase")
    out("")
    header = f"{'procedure':<28}{'first deploy s':>15}{'MB read':>10}{'MB written':>12}{'restart s':>11}{'MB read':>10}"
    out(header)
    out("-" * len(header))
    for name, row in rows.items():
        if "error" in row:
            out(f"{name:<28}  FAILED: see details")
            continue
        f, r = row["first"], row["restart"]
        out(f"{name:<28}{f['seconds']:>15.1f}{fmt_mb(f['read']):>10}{fmt_mb(f['written']):>12}{r['seconds']:>11.1f}{fmt_mb(r['read']):>10}")
    out("")
    out("MB = 10^6 bytes. 'MB read' is from the share (rclone's reads of its source folder), 'MB written' is what landed in the share's folder.")
    out("On the read-write mount (1, 2) rclone's rchar also counts client writes and its upload's re-read of its VFS cache;")
    out("read = rchar - 2 x written there (an estimate; the read-only mount's count (3) is exact).")
    out("Writes to the read-write mount land in rclone's VFS cache on local disk and are uploaded to the share in the background")
    out("at the throttle: a close does not wait for them, as an NFS close does, so 1 and 2 are timed with their writes partly free.")
    out("")
    out("details")
    for name, row in rows.items():
        if "error" in row:
            out(f"  {name}: FAILED: {row['error']}")
            out(f"  rclone's read-write mount log: {(work / 'rclone-rw.log').read_text().strip()[-900:]}")
            continue
        for phase in ("first", "restart"):
            d = row[phase]
            extra = ", ".join(f"{k} {v:.1f} s" for k, v in d.get("steps", {}).items())
            out(f"  {name}, {phase}: {d['seconds']:.1f} s" + (f" (up {d['up_s']:.1f} s)" if "up_s" in d else "")
                + (f"; steps: {extra}" if extra else "")
                + f"; rclone rchar {d['rchar']} wchar {d['wchar']}; written {d['written']}"
                + (f"; uploads went on {d['drain_s']:.1f} s after the answer" if d.get("drain_s", 0) > 0.5 else "")
                + f"; answer {d['answer']!r}")
    for log_text in plain.up_logs[:1]:
        for line in log_text.splitlines():
            if "create: blob" in line or "not linked" in line:
                out(f"  2's create: {line.strip()}")
    for note in notes:
        out(f"  note: {note}")
    out("")
    cache_row = rows.get("3 builder, model cache")
    seed_row = rows.get("1 seed (hand)")
    if cache_row:
        r = cache_row["restart"]
        share_s = model_bytes / (throttle_mb_s * 1e6)
        local_s = model_bytes / (local_mb_s * 1e6)
        ok = r["read"] < MIB
        out(f"{'PASS' if ok else 'FAIL'}  a restart with the model cache reads 0 bytes from the share (under 1 MiB: headers): {r['read']} bytes")
        ok = r["seconds"] < share_s
        out(f"{'PASS' if ok else 'FAIL'}  that restart is bounded by local disk: {r['seconds']:.1f} s, reading the model from local disk "
            f"takes {local_s:.1f} s, from the share {share_s:.1f} s")
    if cache_row and seed_row:
        a, b = cache_row["first"]["seconds"], seed_row["first"]["seconds"]
        out(f"{'PASS' if a <= b else 'FAIL'}  builder with a model cache deploys first no slower than the seed: {a:.1f} s vs {b:.1f} s ({a / b:.2f}x)")
    out(f"took {total:.0f} s in all")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
