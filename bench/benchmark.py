"""The performance figures of issues 7 and 19, measured side by side in one run.

    make bench                      # a 4 GB model
    python3 -m bench.benchmark --size-gb 1 --dir /data/bench

Run as root on an idle machine with a Docker engine (`bash .ci/install-docker.sh`).
Page caches are dropped before each timed copy so the disk, not memory, is
measured. Prints one line per figure with its target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.sample import write_split_model  # noqa: E402
from tests.fixtures.artifact_server import ArtifactServer  # noqa: E402
from tests.fixtures.llama_cpp_release import llama_cpp_release_zip  # noqa: E402
from tests.fixtures.ollama_release import ollama_release_tgz  # noqa: E402

OLLAMA_PATH = "/ollama/ollama/releases/download/v0.5.7/ollama-linux-amd64.tgz"
LLAMA_PATH = "/ggml-org/llama.cpp/releases/download/b4610/llama-b4610-bin-ubuntu-x64.zip"
DOUBLE = REPO / "tests" / "doubles" / "ollama_double.py"


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(argv: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed: {result.stdout[-500:]} {result.stderr[-500:]}")
    return seconds, result


def supervisor(role: str, runtime: dict, work: Path) -> tuple[float, str]:
    path = work / f"runtime-{role}.json"
    path.write_text(json.dumps(runtime))
    env = dict(os.environ, BUILDER_RUNTIME=str(path), PYTHONPATH=str(REPO / "builder"))
    seconds, result = timed([sys.executable, "-m", "supervisor", role], env=env)
    return seconds, result.stdout


def io_line(output: str, role: str) -> tuple[int, int]:
    import re

    match = re.search(rf"{role}: io read (\d+) written (\d+) bytes", output)
    assert match, f"no io line from {role}"
    return int(match[1]), int(match[2])


# The hand procedure, in a child that starts `ollama serve`, runs the client and
# stops the server: /proc/self/io then counts every process it reaped.
HAND = r"""
import json, os, subprocess, sys, time, urllib.request
ollama, store, modelfile, merge = sys.argv[1:5]
def io():
    fields = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])
before = io()
started = time.monotonic()
if merge != "-":
    tool, first, out = merge.split(",")
    subprocess.run([tool, "--merge", first, out], check=True, capture_output=True, env=dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(tool)))
env = dict(os.environ, OLLAMA_MODELS=store, OLLAMA_HOST="127.0.0.1:18997", OLLAMA_NOPRUNE="1", OLLAMA_NO_CLOUD="1")
server = subprocess.Popen([ollama, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(200):
    try:
        urllib.request.urlopen("http://127.0.0.1:18997/", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
subprocess.run([ollama, "create", "bench", "-f", modelfile], env=env, check=True, capture_output=True)
server.terminate()
server.wait()
after = io()
print(json.dumps({"seconds": time.monotonic() - started, "read": after[0] - before[0], "written": after[1] - before[1]}))
"""


def hand_procedure(ollama: Path, store: Path, source: Path, merge: str, work: Path) -> dict:
    modelfile = work / f"Modelfile-{store.name}"
    modelfile.write_text(f"FROM {source}\nPARAMETER num_ctx 2048\n")
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    _, result = timed([sys.executable, "-c", HAND, str(ollama), str(store), str(modelfile), merge], env=env)
    return json.loads(result.stdout)


def measure_generations(work: Path, shards: list[Path], gguf_split: Path) -> dict:
    """The whole path (merge + create) for ollama 0.5.7 and 0.32.15, builder's way
    and by hand, side by side: wall time and bytes read + written per model byte."""
    from tests.fixtures.ollama_release import CURRENT_VERSION, unpack_ollama_release

    size = sum(p.stat().st_size for p in shards)
    folder = shards[0].parent
    rows = {}
    for version in ("0.5.7", CURRENT_VERSION):
        ollama = unpack_ollama_release(work / f"ollama-{version}", version)
        current = version != "0.5.7"
        runtime = {
            "shards": {"first": str(shards[0]), "count": len(shards), "prefix": "m"},
            "merged": str(folder / "m.gguf"),
            "gguf_split": str(gguf_split),
            "merge_tool": "builder",
            "model": "bench:latest",
            "ollama": str(ollama),
            "ollama_store": str(work / f"store-{version}"),
            "create": {"parameters": {"num_ctx": 2048}},
            **({"ollama_generation": "0.30"} if current else {}),
        }
        for leftover in (folder / "m.gguf", folder / "m.gguf.merge.json"):
            leftover.unlink(missing_ok=True)
        drop_caches()
        started = time.monotonic()
        _, merge_out = supervisor("merge", runtime, work)
        _, create_out = supervisor("create", runtime, work)
        subprocess.run(["sync"], check=True)
        seconds = time.monotonic() - started
        moved = sum(io_line(merge_out, "merge")) if not current else 0
        moved += sum(io_line(create_out, "create"))
        rows[f"builder, ollama {version}"] = (seconds, moved / size)
        shutil.rmtree(runtime["ollama_store"])
        (folder / "m.gguf").unlink(missing_ok=True)
        drop_caches()
        if current:  # ollama create FROM the shard folder: hash, upload, rewrite
            hand = hand_procedure(ollama, work / f"hand-{version}", folder, "-", work)
        else:  # llama-gguf-split --merge, then ollama create FROM the merged file
            merged = work / "hand-merged.gguf"
            hand = hand_procedure(ollama, work / f"hand-{version}", merged, f"{gguf_split},{shards[0]},{merged}", work)
            merged.unlink()
        subprocess.run(["sync"], check=True)
        rows[f"by hand, ollama {version}"] = (hand["seconds"], (hand["read"] + hand["written"]) / size)
        shutil.rmtree(work / f"hand-{version}", ignore_errors=True)
    return rows


def measure_merge(work: Path, size_gb: float) -> dict:
    """merge (with digest) / cat, bytes moved by merge + create per model byte."""
    models = work / "models"
    width = 4096
    tensor = width * width * 4
    blocks = max(2, round(size_gb * 1e9 / (10 * tensor)))  # a block: 4 attention and 3 FFN (twice as wide) tensors
    shards = write_split_model(models / "m", "m", 4, blocks=blocks, width=width, random=False)
    size = sum(p.stat().st_size for p in shards)
    llama = work / "llama"
    with zipfile.ZipFile(llama_cpp_release_zip()) as archive:
        archive.extractall(llama)
    gguf_split = llama / "build" / "bin" / "llama-gguf-split"
    gguf_split.chmod(0o755)
    os.environ["LD_LIBRARY_PATH"] = str(gguf_split.parent)

    figures: dict = {"model_bytes": size}
    dropped = drop_caches()
    figures["caches_dropped"] = dropped
    cat_seconds, _ = timed(["sh", "-c", f"cat {' '.join(map(str, shards))} > {models / 'm' / 'cat.out'}; sync"])
    (models / "m" / "cat.out").unlink()
    figures["cat_seconds"] = cat_seconds

    runtime = {
        "shards": {"first": str(shards[0]), "count": 4, "prefix": "m"},
        "merged": str(models / "m" / "m.gguf"),
        "gguf_split": str(gguf_split),
        "merge_tool": "builder",
        "model": "bench:latest",
        "ollama": str(DOUBLE),
        "ollama_store": str(models / "ollama"),
        "create": {"parameters": {"num_ctx": 2048}},
        "modelfile": "/dev/null",
        "port": 0,
    }
    drop_caches()
    started = time.monotonic()
    _, merge_out = supervisor("merge", runtime, work)
    subprocess.run(["sync"], check=True)
    figures["merge_seconds"] = time.monotonic() - started
    merge_read, merge_written = io_line(merge_out, "merge")
    _, create_out = supervisor("create", runtime, work)
    create_read, create_written = io_line(create_out, "create")
    figures["linked"] = "blob linked" in create_out
    figures["bytes_per_model_byte"] = (merge_read + merge_written + create_read + create_written) / size

    # What one core hashes per second: sha256 is sequential, so a merge that
    # hashes as it copies takes at least S / this rate, however fast the disk.
    import hashlib

    block = bytes(64 << 20)
    digest = hashlib.sha256()
    started = time.monotonic()
    for _ in range(16):
        digest.update(block)
    figures["sha256_bytes_per_second"] = 16 * len(block) / (time.monotonic() - started)

    reference = models / "m" / "reference.gguf"
    drop_caches()
    started = time.monotonic()
    timed([str(gguf_split), "--merge", str(shards[0]), str(reference)])
    subprocess.run(["sync"], check=True)
    figures["gguf_split_seconds"] = time.monotonic() - started
    figures["same_bytes_as_gguf_split"] = subprocess.run(["cmp", "-s", str(reference), runtime["merged"]]).returncode == 0
    reference.unlink()
    figures["generations"] = measure_generations(work, shards, gguf_split)
    return figures


def disk_usage(root: Path, keep=lambda path: True) -> int:
    """Bytes the files under `root` take on disk (blocks, as du counts them; hard links once)."""
    seen, total = set(), 0
    for path in root.rglob("*") if root.exists() else ():
        try:
            info = path.lstat()
        except OSError:
            continue
        if path.is_file() and not path.is_symlink() and keep(path) and (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


def build_cache_bytes() -> int:
    """BuildKit's cache not shared with an image (`docker system df`'s Build Cache size)."""
    out = subprocess.run(["docker", "system", "df", "--format", "{{json .}}"], capture_output=True, text=True).stdout
    row = next(json.loads(line) for line in out.splitlines() if '"Build Cache"' in line)
    number, unit = re.match(r"([0-9.]+)\s*([kMGT]?B)", row["Size"]).groups()
    return int(float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit])


def image_layers_bytes(ref: str, dockerfile: Path) -> int:
    """The image's size less its base's: what the build added (the releases and builder's files)."""
    def size(image: str) -> int:
        return int(json.loads(subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True).stdout)[0]["Size"])

    base = next(line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("FROM "))
    return size(ref) - size(base)


def measure_cli(work: Path) -> dict:
    """--help, warm build, no-op up, and the image's own overhead."""
    figures: dict = {}
    builder = [sys.executable, "-m", "builder"]
    runs = []
    for _ in range(5):
        seconds, _ = timed([*builder, "--help"])
        runs.append(seconds)
    figures["help_seconds"] = min(runs)

    server = ArtifactServer(files={OLLAMA_PATH: ollama_release_tgz(), LLAMA_PATH: llama_cpp_release_zip().read_bytes()}).start()
    try:
        project = work / "stack"
        project.mkdir()
        text = (REPO / "builder" / "presets" / "tiny.yaml").read_text()
        text += (
            f"ollama:\n  url: {server.url}/ollama/ollama/releases/download/v{{version}}/ollama-linux-amd64.tgz\n"
            f"llama_cpp:\n  url: {server.url}/ggml-org/llama.cpp/releases/download/{{build}}/llama-{{build}}-bin-ubuntu-x64.zip\n"
        )
        (project / "builder.yaml").write_text(text)
        env = dict(os.environ, BUILDER_PROJECT="bench", BUILDER_IMAGE_TAG="bench", BUILDER_SERVE_PORT="18999",
                   BUILDER_CACHE_DIR=str(work / "cache"), NO_PROXY="127.0.0.1")
        timed([*builder, "sample-model"], cwd=project, env=env)
        subprocess.run(["docker", "buildx", "prune", "--force"], capture_output=True)
        timed([*builder, "up"], cwd=project, env=env)
        figures["disk"] = {
            "archives": disk_usage(work / "cache" / "artifacts", lambda p: p.name.startswith("sha256-") and "." not in p.name),
            "cache": disk_usage(work / "cache"), "context": disk_usage(project / "context"),
            "build_cache": build_cache_bytes(), "image": image_layers_bytes("builder-tiny:bench", project / "context" / "Dockerfile"),
        }
        figures["noop_up_seconds"], _ = timed([*builder, "up"], cwd=project, env=env)
        timed([*builder, "build", "--keep-staged"], cwd=project, env=env)  # the staged trees back, for the warm build
        figures["warm_build_seconds"], _ = timed([*builder, "build", "--keep-staged"], cwd=project, env=env)
        image = json.loads(subprocess.run(["docker", "image", "inspect", "builder-tiny:bench"], capture_output=True, text=True).stdout)[0]
        base_ref = next(l.split()[1] for l in (project / "context" / "Dockerfile").read_text().splitlines() if l.startswith("FROM "))
        base = json.loads(subprocess.run(["docker", "image", "inspect", base_ref], capture_output=True, text=True).stdout)[0]
        staged = sum(p.stat().st_size for p in (project / "context" / "staged").rglob("*") if p.is_file() and not p.is_symlink())
        figures["image_overhead_bytes"] = image["Size"] - base["Size"] - staged
        subprocess.run([*builder, "down", "--volumes"], cwd=project, env=env, capture_output=True)
        subprocess.run(["docker", "image", "rm", "-f", "builder-tiny:bench"], capture_output=True)
        # The host target (no engine): up, then an up with nothing changed.
        host = work / "host"
        host.mkdir()
        (host / "builder.yaml").write_text(text + "target: host\nhost:\n  prefix: ./prefix\n")
        host_env = dict(env, BUILDER_SERVE_PORT="18998")
        timed([*builder, "sample-model"], cwd=host, env=host_env)
        figures["host_up_seconds"], _ = timed([*builder, "up"], cwd=host, env=host_env)
        figures["host_noop_up_seconds"], _ = timed([*builder, "up"], cwd=host, env=host_env)
        subprocess.run([*builder, "down"], cwd=host, env=host_env, capture_output=True)
    finally:
        server.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0, help="model size (default 4)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder on the disk to measure (default: a temp folder)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="builder-bench-", dir=args.dir))
    try:
        merge = measure_merge(work, args.size_gb)
        cli = measure_cli(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = merge["model_bytes"]
    disk = cli["disk"]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"page caches dropped: {merge['caches_dropped']}")
    print(f"model: {size / 1e9:.2f} GB in 4 shards")
    rows = [
        ("merge (with sha256) / cat", f"{merge['merge_seconds']:.1f} s / {merge['cat_seconds']:.1f} s = {merge['merge_seconds'] / merge['cat_seconds']:.2f}", "<= 1.05"),
        ("merge / max(cat, sha256 of S on one core)",
         f"{merge['merge_seconds']:.1f} s / {max(merge['cat_seconds'], size / merge['sha256_bytes_per_second']):.1f} s = "
         f"{merge['merge_seconds'] / max(merge['cat_seconds'], size / merge['sha256_bytes_per_second']):.2f}", "-"),
        ("sha256 on one core", f"{merge['sha256_bytes_per_second'] / 1e9:.2f} GB/s (cat read+wrote {size / merge['cat_seconds'] / 1e9:.2f} GB/s)", "-"),
        ("llama-gguf-split --merge / cat (reference)", f"{merge['gguf_split_seconds']:.1f} s / {merge['cat_seconds']:.1f} s = {merge['gguf_split_seconds'] / merge['cat_seconds']:.2f}", "-"),
        ("same bytes as llama-gguf-split", str(merge["same_bytes_as_gguf_split"]), "True"),
        ("bytes read+written by merge + create per model byte", f"{merge['bytes_per_model_byte']:.3f} (blob linked: {merge['linked']})", "<= 2.05"),
        ("disk after a cold up: cache + context + BuildKit cache",
         f"{disk['cache'] / 1e6:.1f} + {disk['context'] / 1e6:.2f} + {disk['build_cache'] / 1e6:.2f} MB; image {disk['image'] / 1e6:.1f} MB"
         f" (archives {disk['archives'] / 1e6:.1f} MB)", "no staged copy"),
        ("no-op builder up", f"{cli['noop_up_seconds']:.2f} s", "<= 3 s"),
        ("warm builder build", f"{cli['warm_build_seconds']:.2f} s", "<= 3 s"),
        ("builder up --target host (first, tiny model)", f"{cli['host_up_seconds']:.2f} s", "-"),
        ("no-op builder up --target host", f"{cli['host_noop_up_seconds']:.2f} s", "<= 3 s"),
        ("builder --help (best of 5)", f"{cli['help_seconds']:.3f} s", "<= 0.3 s"),
        ("image - (base + ollama + llama.cpp trees)", f"{cli['image_overhead_bytes'] / 1e6:.2f} MB", "<= 10 MB"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<40}  target {target}")
    print()
    print("the whole path (merge + create), builder and the hand procedure, per ollama generation:")
    for name, (seconds, per_byte) in merge["generations"].items():
        print(f"  {name:<28}  {seconds:7.1f} s   {per_byte:6.3f} bytes read+written per model byte")
    print("  (read(2) and write(2) bytes of every process, from /proc/self/io with the children reaped; llama-quantize,"
          " which ollama 0.30+ runs at create, reads its input through mmap, which that does not count: one more model's"
          " worth of reading for the 0.32.15 rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
