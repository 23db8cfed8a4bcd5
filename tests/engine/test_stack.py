"""The stack on the real engine: merge -> create -> serve, and what goes wrong."""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from builder.cli import preset_names
from tests.engine.conftest import NASTY_VALUE, TinyStack, docker
from tests.helpers import run_builder, tree_snapshot

pytestmark = pytest.mark.engine


def _time(value: str) -> datetime:
    # Docker prints nanoseconds; datetime takes microseconds.
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}")


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("preset", preset_names())
def test_compose_accepts_every_preset(preset: str, tmp_path: Path, docker_engine) -> None:
    assert run_builder("init", "--preset", preset, cwd=tmp_path).returncode == 0
    result = run_builder("render", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(docker("compose", "-f", str(tmp_path / "context" / "compose.yaml"), "config").stdout)
    serve = resolved["services"]["serve"]
    assert resolved["services"]["create"]["depends_on"]["merge"]["condition"] == "service_completed_successfully"
    assert serve["depends_on"]["create"]["condition"] == "service_completed_successfully"
    if preset.startswith("deepseek"):
        opts = resolved["volumes"]["models"]["driver_opts"]
        assert opts["type"] == "nfs" and opts["o"].startswith("addr=192.0.2.10,") and opts["device"] == ":/export/models"
    if preset != "tiny":
        devices = serve["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    else:
        assert "deploy" not in serve


def test_up_serves_the_model_and_re_up_is_a_no_op(tiny_stack: TinyStack) -> None:
    shards = tiny_stack.write_model()
    result = tiny_stack.builder("up")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tiny_stack.url} serves tiny:latest"
    # Output a person can read: no web-framework chatter, no key, a few lines.
    printed = (result.stderr + result.stdout).splitlines()
    assert not [l for l in printed if "GIN-debug" in l or "ssh-ed25519" in l or "public key" in l], printed
    assert "merge: done in " in result.stderr and "create: done in " in result.stderr
    # up returned once the supervisor had loaded the model, and said so.
    assert "load: tiny:latest loaded in " in result.stderr and ", on the CPU (gpus: none)" in result.stderr
    (loaded,) = _get(f"{tiny_stack.url}/api/ps")["models"]
    assert loaded["name"] == "tiny:latest" and int(loaded["expires_at"][:4]) > 2300  # keep_alive -1
    healthy = docker("exec", tiny_stack.container("serve"), "python3", "-m", "supervisor", "health", "--loaded", check=False)
    assert healthy.returncode == 0, healthy.stderr
    merge, create, serve = (tiny_stack.inspect(s) for s in ("merge", "create", "serve"))
    for one_shot in (merge, create):
        assert one_shot["State"]["Status"] == "exited" and one_shot["State"]["ExitCode"] == 0
    assert _time(merge["State"]["FinishedAt"]) <= _time(create["State"]["StartedAt"])
    assert _time(create["State"]["FinishedAt"]) <= _time(serve["State"]["StartedAt"])
    assert serve["State"]["Health"]["Status"] == "healthy"
    assert f"BUILDER_TEST_NASTY={NASTY_VALUE}" in serve["Config"]["Env"]
    assert serve["NetworkSettings"]["Ports"]["11434/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(tiny_stack.port)}]
    # Least privilege on every service, and the stack still merges, creates and answers under it.
    for container in (merge, create, serve):
        host = container["HostConfig"]
        assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges:true"]
        assert host["ReadonlyRootfs"] is True and host["PidsLimit"] == 512 and "/tmp" in host["Tmpfs"]
    image = json.loads(docker("image", "inspect", tiny_stack.image).stdout)[0]
    assert image["Config"]["Healthcheck"]["Test"] == ["CMD", "python3", "-m", "supervisor", "health"]
    # Secure defaults: not root, and serve cannot write to the model storage.
    assert serve["Config"]["User"] == "1000:1000" and merge["Config"]["User"] == "1000:1000"
    assert [m["RW"] for m in serve["Mounts"] if m["Destination"] == "/models"] == [False]
    assert [m["RW"] for m in merge["Mounts"] if m["Destination"] == "/models"] == [True]
    # The merged file is beside the shards; ollama's store is on the same volume.
    assert (tiny_stack.models / "tiny.gguf").is_file()
    assert (tiny_stack.root / "models" / "ollama" / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest").is_file()
    # Zero copy: the blob ollama serves is the merged file itself, by hard link.
    assert "create: blob linked in /models/ollama/blobs: no copy" in result.stderr
    blobs = [p for p in (tiny_stack.root / "models" / "ollama" / "blobs").iterdir() if p.stat().st_ino == (tiny_stack.models / "tiny.gguf").stat().st_ino]
    assert len(blobs) == 1 and blobs[0].stat().st_nlink == 2
    tags = _get(f"{tiny_stack.url}/api/tags")
    assert [m["name"] for m in tags["models"]] == ["tiny:latest"]
    # A real forward pass (the double's runner is llama.cpp): greedy, 16 tokens (the preset's num_predict).
    answer = _get(f"{tiny_stack.url}/api/generate", {"model": "tiny", "prompt": "hello", "stream": False})
    assert answer["done"] is True and answer["eval_count"] == 16 and len(answer["response"]) == 16

    status = json.loads(tiny_stack.builder("status", "--json").stdout)
    assert status["services"]["serve"]["state"] == "running" and status["model_listed"] is True
    assert status["services"]["merge"]["exit_code"] == 0

    again = tiny_stack.builder("up")  # how fast a no-op up is: a benchmark figure
    assert again.returncode == 0, again.stderr
    assert "is up to date with its 3 shards; nothing to do" in again.stderr
    assert "is up to date with /models/tiny/tiny.gguf and its create request; nothing to do" in again.stderr
    assert tiny_stack.inspect("serve")["State"]["StartedAt"] == serve["State"]["StartedAt"], "serve must keep running"
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in sorted(tiny_stack.models.glob("tiny-*"))]

    logs = tiny_stack.builder("logs", "merge")
    assert logs.returncode == 0 and "joining 3 shards" in logs.stdout
    # With the image built, a fresh stack takes a handful of lines.
    assert tiny_stack.builder("down").returncode == 0
    fresh = tiny_stack.builder("up")
    assert fresh.returncode == 0, fresh.stderr
    lines = (fresh.stderr + fresh.stdout).splitlines()
    assert len(lines) <= 15, lines
    assert not [l for l in lines if "GIN-debug" in l or "ssh-ed25519" in l or "public key" in l], lines
    serve_logs = tiny_stack.builder("logs", "serve").stdout
    assert "serve: tiny:latest loaded in" in serve_logs
    assert "GIN-debug" not in serve_logs and "ssh-ed25519" not in serve_logs
    assert "serve: ollama made its key pair in $HOME/.ollama" in serve_logs
    # create's private ollama wrote to its own log beside the create record, and did say all that.
    private = (tiny_stack.root / "models" / "ollama" / ".builder-create.log").read_text()
    assert "[GIN-debug]" in private


@pytest.mark.parametrize("damage", ["missing", "truncated", "other-model"])
def test_bad_shard_stops_the_stack_before_serve(tiny_stack: TinyStack, damage: str, tmp_path: Path) -> None:
    from builder.sample import write_split_model

    tiny_stack.write_model()
    second = tiny_stack.models / "tiny-00002-of-00003.gguf"
    if damage == "missing":
        second.unlink()
    elif damage == "truncated":
        second.write_bytes(second.read_bytes()[:-4096])
    else:
        other = write_split_model(tmp_path / "other", "tiny", 3, blocks=6)
        second.write_bytes(other[1].read_bytes())
    before = tree_snapshot(tiny_stack.models)
    result = tiny_stack.builder("up")
    # The preflight reads the shards before anything is rendered, built or
    # started (the merge container makes the same checks where the host
    # cannot read the storage: tests/test_supervisor_merge.py).
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tiny_stack.config}: model.shards: ")
    expected = {
        "missing": f"1 of 3 shard(s) missing in {tiny_stack.models}: tiny-00002-of-00003.gguf",
        "truncated": f"shard {tiny_stack.models}/tiny-00002-of-00003.gguf is truncated",
        "other-model": "a shard belongs to another model",
    }[damage]
    assert expected in last, last
    assert not tiny_stack.context.exists(), "nothing is rendered before the shards pass"
    started = docker("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={tiny_stack.project}").stdout.split()
    assert started == [], "no container is started"
    assert tree_snapshot(tiny_stack.models) == before


def test_killed_merge_leaves_no_file_under_the_final_name(tiny_stack: TinyStack) -> None:
    # Big enough (1 GiB) that the merge takes a moment to catch; if it still
    # finishes first, start over (the race is the test's, not builder's).
    tiny_stack.write_model(blocks=6, width=2048, random=False)  # about 1 GB
    assert tiny_stack.builder("build").returncode == 0
    merged = tiny_stack.models / "tiny.gguf"
    for _attempt in range(4):
        tiny_stack.compose("up", "-d", "--no-deps", "merge")
        container = tiny_stack.container("merge")
        deadline = time.time() + 120
        while not any(p.stat().st_size > 0 for p in tiny_stack.models.glob(".tiny.gguf.merging-*")) and not merged.exists():
            assert time.time() < deadline, "the merge never started"
            time.sleep(0.01)
        docker("pause", container, check=False)  # freeze it at once, then kill
        docker("kill", container, check=False)
        if not merged.exists():
            break
        merged.unlink()
        Path(str(merged) + ".merge.json").unlink()
    else:
        pytest.fail("the merge finished before it could be killed, four times")
    assert list(tiny_stack.models.glob(".tiny.gguf.merging-*")), "the kill should have left the temporary file"
    result = tiny_stack.builder("up")
    assert result.returncode == 0, result.stderr
    assert "removed .tiny.gguf.merging-" in result.stderr
    assert list(tiny_stack.models.glob(".tiny.gguf.merging-*")) == []
    assert merged.is_file()


def test_killed_ollama_comes_back(tiny_stack: TinyStack) -> None:
    tiny_stack.write_model()
    assert tiny_stack.builder("up").returncode == 0
    container = tiny_stack.container("serve")
    kill = (
        "import os, signal\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    cmd = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
        "    if cmd[:1] == [b'/usr/local/bin/ollama'] or (len(cmd) > 1 and cmd[1].endswith(b'/usr/local/bin/ollama')):\n"
        "        os.kill(int(pid), signal.SIGKILL); print('killed', pid)\n"
    )
    out = docker("exec", container, "python3", "-c", kill).stdout
    assert out.startswith("killed")
    deadline = time.time() + 30
    while True:
        try:
            if [m["name"] for m in _get(f"{tiny_stack.url}/api/tags")["models"]] == ["tiny:latest"]:
                break
        except OSError:
            pass
        assert time.time() < deadline, "ollama did not come back within 30 s"
        time.sleep(0.5)
    logs = tiny_stack.compose("logs", "serve").stdout
    assert "restart 1 of 5" in logs
    assert tiny_stack.inspect("serve")["RestartCount"] == 0, "the supervisor, not Docker, restarted it"


def test_gpu_request_reaches_the_engine(gpu_stack: TinyStack) -> None:
    from tests.engine.test_doctor import machine_has

    gpu_stack.write_model()
    result = gpu_stack.builder("up")
    if machine_has()["toolkit"] and machine_has()["gpu"]:  # a GPU host: the request is granted and serve loads
        assert result.returncode == 0, result.stderr[-2000:]
        assert "gpu" in json.dumps(gpu_stack.inspect("serve")["HostConfig"]["DeviceRequests"])
        return
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: serve did not start: ")
    assert 'could not select device driver "nvidia" with capabilities: [[gpu]]' in last
    assert last.endswith("the NVIDIA container toolkit is missing on this host (or set gpus: none)")
    assert gpu_stack.inspect("create")["State"]["ExitCode"] == 0


def test_a_changed_config_rebuilds_and_creates_again(tiny_stack: TinyStack) -> None:
    tiny_stack.write_model()
    assert tiny_stack.builder("up").returncode == 0
    text = tiny_stack.config.read_text().replace("temperature: 0", "temperature: 0.7")
    tiny_stack.config.write_text(text)
    result = tiny_stack.builder("up")
    assert result.returncode == 0, result.stderr
    assert "building: builder-tiny:" in result.stderr and "was built from another config" in result.stderr
    assert "merge: /models/tiny/tiny.gguf is up to date" in result.stderr, "the shards did not change"
    assert "create: registering tiny:latest" in result.stderr, "the Modelfile did"
    show = _get(f"{tiny_stack.url}/api/show", {"model": "tiny"})
    assert "temperature" in show["parameters"] and "0.7" in show["parameters"]


def test_down_works_even_when_the_config_no_longer_validates(tiny_stack: TinyStack) -> None:
    tiny_stack.write_model()
    assert tiny_stack.builder("up").returncode == 0
    tiny_stack.config.write_text(tiny_stack.config.read_text().replace("shards: tiny/", "shards: /gone/"))
    result = tiny_stack.builder("down")
    assert result.returncode == 0, result.stderr
    assert tiny_stack.container("serve") is None


def test_single_container_target(tiny_stack: TinyStack) -> None:
    tiny_stack.write_model()
    result = tiny_stack.builder("up", "--target", "single")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tiny_stack.url} serves tiny:latest"
    run_sh = (tiny_stack.context / "single" / "run.sh").read_text()
    assert f"--name {tiny_stack.project}" in run_sh and run_sh.rstrip().endswith("all")
    assert tiny_stack.container("merge") is None, "no Compose services in the single target"
    logs = docker("logs", tiny_stack.project).stdout
    assert "merge: joining 3 shards" in logs and "create: registering tiny:latest" in logs and "serve: starting" in logs
    from tests.fixtures.llama_cpp_release import llama_cpp_bin_dir
    from tests.test_sample_model import greedy

    answer = _get(f"{tiny_stack.url}/api/generate", {"model": "tiny", "prompt": "one box", "stream": False, "options": {"num_predict": 8}})
    expected, _ = greedy(llama_cpp_bin_dir(), tiny_stack.models / "tiny.gguf", "one box", 8)
    assert (answer["response"], answer["eval_count"]) == (expected, 8)
    host = json.loads(docker("inspect", tiny_stack.project).stdout)[0]["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] is True and host["PidsLimit"] == 512
    report = json.loads(tiny_stack.builder("status", "--target", "single", "--json").stdout)
    assert report["target"] == "single" and report["services"] == {"all": report["services"]["all"]}
    assert report["services"]["all"]["state"] == "running" and report["model_listed"] is True
    again = tiny_stack.builder("up", "--target", "single")
    assert again.returncode == 0 and "already running with this config" in again.stderr
    assert tiny_stack.builder("down", "--target", "single").returncode == 0
    assert docker("inspect", tiny_stack.project, check=False).returncode != 0


def test_storage_the_containers_cannot_write_is_refused_first(tiny_stack: TinyStack) -> None:
    tiny_stack.write_model()
    tiny_stack.own(0, 0)
    (tiny_stack.root / "models").chmod(0o755)
    result = tiny_stack.builder("up")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"storage.local: {tiny_stack.root / 'models'} is not writable by the containers' user 1000:1000; "
        f"chown -R 1000:1000 {tiny_stack.root / 'models'} (or set image.uid and image.gid)"
    )
    assert "building" not in result.stderr


def test_full_storage_is_one_clear_error_and_leaves_nothing(tiny_stack: TinyStack) -> None:
    import subprocess

    models = tiny_stack.root / "models"
    models.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(models)], check=True)
    try:
        tiny_stack.write_model(blocks=4, width=256)  # about 11 MB of shards: no room for a merged copy
        before = tree_snapshot(tiny_stack.models)
        result = tiny_stack.builder("up")
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert "merge: /models/tiny has" in last and "free, the merged file needs" in last and "free some space" in last
        assert tree_snapshot(tiny_stack.models) == before
        assert not list(tiny_stack.models.glob(".tiny.gguf.merging-*"))
    finally:
        tiny_stack.down()
        subprocess.run(["umount", str(models)], check=False)


def test_killed_create_leaves_no_copy_to_pile_up(tiny_stack: TinyStack) -> None:
    tiny_stack.write_model()
    assert tiny_stack.builder("build").returncode == 0
    assert tiny_stack.compose("up", "--no-deps", "--exit-code-from", "merge", "merge").returncode == 0
    store = tiny_stack.root / "models" / "ollama"
    blobs = store / "blobs"
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    # Kill create once the blob is placed and before ollama wrote the manifest;
    # if create still finishes first, undo it and try again (the race is the test's).
    for _attempt in range(4):
        tiny_stack.compose("up", "-d", "--no-deps", "create")
        container = tiny_stack.container("create")
        deadline = time.time() + 60
        while not (blobs.is_dir() and any(blobs.iterdir())):
            assert time.time() < deadline, "create never placed the blob"
            time.sleep(0.005)
        docker("pause", container, check=False)
        docker("kill", container, check=False)
        state = json.loads(docker("inspect", container).stdout)[0]["State"]
        if state["ExitCode"] == 137 and not manifest.exists():
            break
        docker("rm", "-f", container, check=False)
        for path in [manifest, store / ".builder-create.json", *blobs.iterdir()]:
            path.unlink(missing_ok=True)
    else:
        pytest.fail("create finished before it could be killed, four times")
    assert state["ExitCode"] == 137 and not manifest.exists()
    result = tiny_stack.builder("up")
    assert result.returncode == 0, result.stderr
    merged = (tiny_stack.models / "tiny.gguf").stat()
    same_size = [p for p in blobs.iterdir() if p.stat().st_size == merged.st_size]
    assert [p.stat().st_ino for p in same_size] == [merged.st_ino], "one blob, and it is the merged file itself"
    assert not [p.name for p in blobs.iterdir() if p.name.startswith(".")], "no temporary link left behind"
    assert [m["name"] for m in _get(f"{tiny_stack.url}/api/tags")["models"]] == ["tiny:latest"]


def test_status_only_reads_and_a_new_lock_rebuilds(tiny_stack: TinyStack, release_server) -> None:
    import shutil

    from tests.engine.conftest import OLLAMA_PATH
    from tests.fixtures.ollama_release import ollama_release_tgz

    tiny_stack.write_model()
    assert tiny_stack.builder("up").returncode == 0
    # A query writes nothing: no context is rendered, a stray file there is no obstacle.
    shutil.rmtree(tiny_stack.context)
    result = tiny_stack.builder("status", "--json")
    assert result.returncode == 0, result.stderr
    assert not tiny_stack.context.exists()
    report = json.loads(result.stdout)
    assert report["target"] == "compose" and report["image_stale"] is None and report["model_listed"] is True
    assert report["services"]["serve"]["state"] == "running"
    # New release archives, a new lock: the image is stale and up rebuilds it.
    original = release_server.files[OLLAMA_PATH]
    try:
        release_server.files[OLLAMA_PATH] = ollama_release_tgz(extra={"./lib/ollama/NOTICE": b"a newer release\n"})
        assert tiny_stack.builder("lock").returncode == 0
        report = json.loads(tiny_stack.builder("status", "--json").stdout)
        assert report["image_stale"] == f"{tiny_stack.image} was built from another builder.lock (other release archives)"
        doctor = json.loads(tiny_stack.builder("doctor", "--json").stdout)
        assert {c["name"]: c for c in doctor}["image"]["detail"] == report["image_stale"]
        again = tiny_stack.builder("up")
        assert again.returncode == 0, again.stderr
        assert f"building: {tiny_stack.image} was built from another builder.lock" in again.stderr
        assert json.loads(tiny_stack.builder("status", "--json").stdout)["image_stale"] is None
    finally:
        release_server.files[OLLAMA_PATH] = original


def test_a_model_llama_cpp_refuses_fails_up_with_the_cause(tiny_stack: TinyStack) -> None:
    from tests.fixtures.gguf_edit import edit_metadata

    shards = tiny_stack.write_model()
    # Whole, one split, a tokenizer: the preflight passes. But the embedding
    # width disagrees with the tensors, which llama.cpp checks at load.
    edit_metadata(shards[0], values={"llama.embedding_length": 32})
    tiny_stack.own()
    quick = tiny_stack.builder("up", "--no-load")  # does not wait for the load: the failure is not its business
    assert quick.returncode == 0, quick.stderr
    assert "load:" not in quick.stderr
    result = tiny_stack.builder("up")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tiny:latest did not load: llama runner process has terminated: error loading model: "), last
    assert "error loading model hyperparameters: invalid n_rot: 16, expected 8" in last
    assert last.endswith("(HTTP 500); the stack is left up for `builder logs serve`")
    assert tiny_stack.inspect("serve")["State"]["Running"] is True, "not a restart loop: ollama itself is fine"
    unhealthy = docker("exec", tiny_stack.container("serve"), "python3", "-m", "supervisor", "health", "--loaded", check=False)
    assert unhealthy.returncode == 1 and "is not loaded (failed: llama runner process has terminated" in unhealthy.stderr
    status = tiny_stack.builder("status")
    assert "model     not loaded: the supervisor's load failed: llama runner process has terminated: error loading model" in status.stdout, status.stdout
    assert json.loads(tiny_stack.builder("status", "--json").stdout)["load_failed"].startswith("llama runner process has terminated")
    status = json.loads(tiny_stack.builder("status", "--json").stdout)
    assert status["loaded"] is None
