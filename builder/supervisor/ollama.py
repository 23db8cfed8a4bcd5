"""Talking to ollama: start a private server, wait for it, ask its API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from .common import Progress, StepError, open_loopback


def ollama_env(host: str | None = None, store: str | None = None) -> dict[str, str]:
    """ollama's environment: without llama.cpp's LD_LIBRARY_PATH (whose libggml
    would shadow the one ollama's runners expect) but with the one the host
    target found (BUILDER_OLLAMA_LD_LIBRARY_PATH: ollama finds CUDA's
    libraries along it), with pruning off, so a blob builder placed is never
    deleted before a manifest names it, and without ollama's cloud features
    (no traffic to ollama.com)."""
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    machine = env.pop("BUILDER_OLLAMA_LD_LIBRARY_PATH", "")
    if machine:
        env["LD_LIBRARY_PATH"] = machine
    env.setdefault("OLLAMA_NOPRUNE", "1")
    # ollama 0.30+ asks ollama.com for recommendations and cloud models unless told not to.
    env.setdefault("OLLAMA_NO_CLOUD", "1")
    if host:
        env["OLLAMA_HOST"] = host
    if store:
        env["OLLAMA_MODELS"] = store  # where create placed the blob, whatever the environment says
    return env


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(base: str, method: str, path: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with open_loopback(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def create_streamed(base: str, body: dict, idle_timeout: float = 600.0) -> None:
    """POST /api/create with progress: ollama streams {"status", "total",
    "completed"} lines and ends with "success" or {"error"}. A long rewrite
    (ollama 0.30+ copies the whole model) shows as a progress line; the
    timeout is between two lines, never for the whole create."""
    data = json.dumps(dict(body, stream=True)).encode()
    req = urllib.request.Request(base + "/api/create", data=data, method="POST", headers={"Content-Type": "application/json"})
    progress: Progress | None = None
    label = None
    try:
        with open_loopback(req, timeout=idle_timeout) as response:
            for raw in response:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                if event.get("error"):
                    raise StepError(f"create: ollama refused to create {body['model']}: {event['error']}")
                status = str(event.get("status", ""))
                if event.get("total") and event.get("completed") is not None:
                    if status != label:
                        if progress is not None:
                            progress.finish()
                        # ollama's total for a split model is its first shard: show the share only.
                        label, progress = status, Progress(f"create: ollama: {status}", int(event["total"]), sizes=False)
                    progress.update(int(event["completed"]))
                    continue
                if progress is not None:
                    progress.finish()
                    progress, label = None, None
                if status == "success":
                    return
    except urllib.error.HTTPError as exc:
        answer = exc.read()
        try:
            error = json.loads(answer).get("error")
        except (ValueError, AttributeError):
            error = None
        error = error or answer[:300].decode("utf-8", "replace").strip()
        raise StepError(f"create: ollama refused to create {body['model']} (HTTP {exc.code}: {error})") from None
    except (TimeoutError, OSError) as exc:
        if isinstance(exc, TimeoutError) or "timed out" in str(exc):
            raise StepError(f"create: ollama said nothing for {idle_timeout:.0f} s while creating {body['model']}; "
                            "the storage may be stalled, see the private ollama's log") from None
        raise StepError(f"create: the private ollama stopped answering while creating {body['model']} ({exc})") from None
    raise StepError(f"create: ollama's answer to creating {body['model']} ended without success")


def wait_until_up(base: str, process: subprocess.Popen | None, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if process is not None and process.poll() is not None:
            raise StepError(f"ollama serve exited with status {process.returncode} before it answered")
        try:
            status, body = request(base, "GET", "/", timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise StepError(f"ollama serve did not answer at {base} within {seconds:.0f} s")
        time.sleep(0.2)


class PrivateServer:
    """`ollama serve` on a free loopback port, for the create step only."""

    def __init__(self, binary: str, store: str):
        self.binary = binary
        self.store = store
        self.port = free_loopback_port()
        self.host = f"127.0.0.1:{self.port}"
        self.base = f"http://{self.host}"
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> str:
        """create's private server writes here (replaced each run): the
        operator sees the supervisor's lines, and this file's tail on failure."""
        return os.path.join(self.store, ".builder-create.log")

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(list(handle)[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "PrivateServer":
        env = ollama_env(self.host, self.store)
        env.setdefault("GIN_MODE", "release")
        # A home that lasts with the store: ollama makes its key pair once, not on every create.
        home = os.path.join(self.store, ".builder-home")
        os.makedirs(home, mode=0o700, exist_ok=True)
        env["HOME"] = home
        try:
            self.log = open(self.log_path, "w", encoding="utf-8")
            self.process = subprocess.Popen(
                [self.binary, "serve"], env=env, start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            raise StepError(f"cannot run {self.binary}: {exc.strerror}; rebuild the image with `builder build`") from None
        try:
            wait_until_up(self.base, self.process, 120)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to ollama and its runners (its own process group), then SIGKILL."""
        if self.process is None:
            return
        if self.process.poll() is None:
            signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        signal_group(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
            _cap(self.log_path, LOG_CAP_BYTES)

    def __exit__(self, *exc) -> None:
        self.stop()


LOG_CAP_BYTES = 4 << 20


def _cap(path: str, limit: int) -> None:
    """Keep the last `limit` bytes of a log."""
    try:
        if os.path.getsize(path) > limit:
            with open(path, "rb") as handle:
                handle.seek(-limit, os.SEEK_END)
                data = handle.read()
            with open(path, "wb") as handle:
                handle.write(data)
    except OSError:
        pass


def signal_group(pid: int, signum: int) -> None:
    """Signal a process group (ollama and its runners); gone already is fine."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def manifest_path(store: str, model: str) -> str:
    """Where ollama keeps a model's manifest: manifests/registry.ollama.ai/NAMESPACE/NAME/TAG."""
    name, _, tag = model.partition(":")
    namespace, _, repo = name.rpartition("/")
    return os.path.join(store, "manifests", "registry.ollama.ai", namespace or "library", repo, tag or "latest")


class OllamaChatter:
    """Drops what ollama prints that is not for the operator: gin's debug
    route table and its warnings (0.5.7 prints them whatever GIN_MODE says:
    its build pins gin's mode) and the key-pair announcement (the key is only
    used to push to ollama.com). One line says the key was made."""

    def __init__(self):
        self.skip_blank = False
        self.in_key = 0

    def keep(self, line: str) -> bool:
        text = line.rstrip("\n")
        if self.in_key:
            self.in_key -= 1
            if text.startswith("ssh-ed25519 "):
                self.in_key = 1  # the blank line after the key
            return False
        if text.startswith("[GIN-debug]") or text.startswith((" - using env:", " - using code:")):
            self.skip_blank = True
            return False
        if not text.strip() and self.skip_blank:
            return False
        self.skip_blank = False
        if text.startswith("Couldn't find '") and "Generating new private key." in text:
            return False
        if text.startswith("Your new public key is:"):
            self.in_key = 2  # a blank line, then the key
            return False
        return True
