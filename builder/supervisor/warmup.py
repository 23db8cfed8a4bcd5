"""Load the model before anyone asks for it, and say how that went.

ollama loads a model at its first request: with a 150 GB model that request
waits minutes, and a model that cannot load (llama.cpp refuses it, the GPUs
run out of memory) fails in front of the first user. The serve role runs a
Warmer beside ollama: once ollama answers, it loads the model the documented
way (`POST /api/generate` with the model and no prompt), records the outcome
in a state file (`health --loaded` and `builder up` read it), and loads it
again whenever ollama restarted or unloaded it (not while another request
is loading it again with other options: ollama 0.30+ does not list a model
in /api/ps until its load is done, but its runner is there). A failed load
is not retried until ollama itself restarts: the same request would fail
the same way.

The load request has no deadline of its own: OLLAMA_LOAD_TIMEOUT is a stall
timer in ollama (reset while the load progresses), so ollama decides when a
load has failed. While it waits, the warmer reads the runner's progress
(loadwatch: bytes read of the model) into the record, which `up` shows; it
hangs up only after STALL_FACTOR times ollama's timer without a byte read,
when ollama itself is wedged.

With mmap, llama.cpp maps the model with MAP_POPULATE, which reads all of it
before the load reports any progress: ollama 0.5.7's timer then needs the
whole read to fit in OLLAMA_LOAD_TIMEOUT. The warmer measures the rate and
says, while there is time, when it will not fit and what to set instead.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
from collections import deque
from typing import Callable

from . import loadwatch
from .common import Progress, human_bytes, log, write_json_atomic
from .ollama import request

STATE_FILE = "builder-serve-state.json"
POLL_SECONDS = 5.0
SAMPLE_SECONDS = 1.0  # how often a load's progress is read and recorded
STALL_FACTOR = 3  # the warmer hangs up after this many load timeouts without a byte read


def state_path() -> str:
    """Where the serve role records the load: $BUILDER_STATE_DIR, else /tmp."""
    return os.path.join(os.environ.get("BUILDER_STATE_DIR") or "/tmp", STATE_FILE)


def read_state() -> dict:
    try:
        with open(state_path(), encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def keep_alive_value(text: str):
    """keep_alive for the API: a number of seconds as a number (ollama takes a
    string only as a Go duration), a duration as it is."""
    try:
        return int(text)
    except ValueError:
        return text


def ps_entry(base: str, model: str) -> dict | None:
    """The model's entry in /api/ps, or None when it is not loaded."""
    status, body = request(base, "GET", "/api/ps", timeout=5)
    if status != 200:
        return None
    wanted = model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"
    for entry in json.loads(body or b"{}").get("models") or []:
        if entry.get("name") in (model, wanted) or entry.get("model") in (model, wanted):
            return entry
    return None


class OutputTail:
    """The last lines ollama printed, for naming the cause of a failure."""

    def __init__(self, size: int = 60):
        self.lines: deque[str] = deque(maxlen=size)
        self.lock = threading.Lock()

    def add(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)

    def cause(self) -> str:
        """The most telling recent line: a panic, else an error, else the last one."""
        with self.lock:
            lines = list(self.lines)
        for markers in (("panic:",), ("CUDA error", "cudaMalloc failed", "out of memory", "error loading model", "error:", "level=ERROR")):
            for line in reversed(lines):
                if any(marker in line for marker in markers):
                    return line.strip()
        return lines[-1].strip() if lines else ""


class Warmer(threading.Thread):
    """Keeps the model loaded while ollama runs (see the module's docstring)."""

    def __init__(self, base: str, model: str, keep_alive: str, load_timeout: int, stop: threading.Event,
                 generation: Callable[[], int | None], tail: OutputTail,
                 server_pid: Callable[[], int | None] = lambda: None, model_bytes: int = 0, auto_timeout: bool = True,
                 store: str | None = None, read_ahead: bool = True):
        super().__init__(name="warmer", daemon=True)
        self.base = base
        self.model = model
        self.keep_alive = keep_alive
        self.load_timeout = load_timeout
        self.stop = stop
        self.generation = generation
        self.tail = tail
        self.server_pid = server_pid
        self.model_bytes = model_bytes
        self.auto_timeout = auto_timeout
        self.store = store
        self.read_ahead = read_ahead
        self.state: dict = {}
        self.restarts = 0

    def count_restart(self) -> None:
        """ollama was restarted: say so in the record (`status` shows the count)."""
        self.restarts += 1
        self.record(**{k: v for k, v in self.state.items() if k not in ("model", "load_timeout_s", "at", "restarts")} or {"state": "restarting"})

    def record(self, **state) -> None:
        self.state = dict(state, model=self.model, load_timeout_s=self.load_timeout, at=time.time(), restarts=self.restarts)
        try:
            write_json_atomic(state_path(), self.state)
        except OSError as exc:
            log(f"serve: cannot record the load in {state_path()}: {exc.strerror}")

    def run(self) -> None:
        tried = None  # the ollama generation a load was last tried in
        reloading = False  # another request is loading the model again (said once)
        while not self.stop.is_set():
            current = self.generation()
            try:
                entry = ps_entry(self.base, self.model) if current is not None else None
            except (OSError, ValueError):
                self.stop.wait(0.5)
                continue
            if current is None:
                self.stop.wait(0.5)
                continue
            # ollama 0.5.7 lists a model in /api/ps while it is still loading
            # (0.30+ only once loaded): only an answered load request says it is loaded.
            if entry is not None and self.state.get("state") == "loaded":
                reloading = False
                self.stop.wait(POLL_SECONDS)
                continue
            if self.state.get("state") == "failed" and tried == current:
                self.stop.wait(POLL_SECONDS)
                continue
            if self.state.get("state") == "loaded":
                if self._runner_alive():
                    # Unlisted, yet its runner lives: another request is loading
                    # it again with other options (ollama 0.30+ lists a model
                    # only once it is loaded). A second load would undo that
                    # one and cost another full read of the model; wait for it.
                    if not reloading:
                        log(f"serve: {self.model} is being loaded again by a request with other options; waiting for that load")
                    reloading = True
                    self.stop.wait(POLL_SECONDS)
                    continue
                log(f"serve: {self.model} is no longer loaded; loading it again")
            reloading = False
            tried = current
            self._load(current)

    def _loaded(self, entry: dict, seconds: float, runner: loadwatch.Runner | None, read: int) -> None:
        size, vram = int(entry.get("size", 0)), int(entry.get("size_vram", 0))
        mode = None if runner is None else ("mmap" if runner.mmap else "no-mmap")
        self.record(state="loaded", load_seconds=round(seconds, 3), size=size, size_vram=vram,
                    expires_at=entry.get("expires_at", ""), read=read, mode=mode)
        log(f"serve: {self.model} loaded in {seconds:.1f} s ({human_bytes(size)}, {human_bytes(vram)} of it in GPU memory"
            + (f"; {human_bytes(read)} read, {mode})" if runner else ")"))

    def _read_ahead(self, since: float) -> None:
        """Read the model through the page cache before ollama is asked to
        load it, when the free RAM holds it: ollama's timer is not running
        yet, so storage of any speed is fine, `up` shows the progress, and the
        load itself then reads memory (with mmap, llama.cpp's MAP_POPULATE
        reads the whole file before it reports progress; see the module)."""
        path = loadwatch.model_blob(self.store, self.model) if self.store and self.read_ahead else None
        if path is None:
            return
        size = os.path.getsize(path)
        free = loadwatch.available_ram()
        if free is None or free < size + loadwatch.READ_AHEAD_MARGIN:
            log(f"serve: not reading the model ahead: {human_bytes(size)} would not fit the free RAM "
                f"({'unknown' if free is None else human_bytes(free)}); ollama reads it itself (without mmap when RAM is short)")
            return
        log(f"serve: reading {self.model} ({human_bytes(size)}) through the page cache before ollama loads it")
        rate, began = loadwatch.Rate(), time.monotonic()
        progress = Progress(f"reading {self.model}", size)

        def note(done: int) -> None:
            progress.update(done)
            self.record(state="loading", since=since, read=done, total=size, rate=round(rate.add(time.monotonic(), done)),
                        mode="read-ahead", idle_s=0)

        try:
            done = loadwatch.read_through(path, note, self.stop)
        except OSError as exc:
            log(f"serve: reading the model ahead stopped ({exc.strerror}); ollama reads it itself")
            return
        seconds = progress.finish()
        if done:
            log(f"serve: read {human_bytes(done)} in {seconds:.0f} s ({human_bytes(done / max(seconds, 0.001))}/s)")

    def _load(self, generation: int) -> None:
        since = time.time()
        self.record(state="loading", since=since)
        self._read_ahead(since)
        if self.stop.is_set():
            return
        log(f"serve: loading {self.model} (ollama gives up after {self.load_timeout} s without progress)")
        self.record(state="loading", since=since)
        started = time.monotonic()
        body = {"model": self.model, "keep_alive": keep_alive_value(self.keep_alive)}
        call = LoadCall(self.base, body)
        call.start()
        runner, read, last_read_at, advice, speed, first_read_at = None, 0, time.monotonic(), None, 0.0, 0.0
        ticks, mapped = 0, 0
        rate = loadwatch.Rate()
        progress = Progress(f"loading {self.model}", self.model_bytes) if self.model_bytes else None
        while not call.done.wait(SAMPLE_SECONDS):
            now = time.monotonic()
            if self.stop.is_set():
                call.hang_up()
                return
            if runner is None or not os.path.exists(f"/proc/{runner.pid}"):
                runner = loadwatch.find_runner(self.server_pid())
            if runner is not None and runner.mmap and (ticks % 5 == 0 or mapped < (1 << 30)):
                mapped = loadwatch.mapped_resident(runner)  # past 1 GiB, every 5th sample: smaps walks the page tables
            ticks += 1
            current = (loadwatch.file_offset(runner) + mapped) if runner is not None else 0
            if current > read:
                read, last_read_at = current, now
                first_read_at = first_read_at or now
            speed = rate.add(now, read) if first_read_at else 0.0  # from the first byte: starting the runner is no read
            if (advice is None and runner is not None and runner.mmap and first_read_at
                    and now - first_read_at >= min(10.0, self.load_timeout / 2)):
                advice = mmap_advice(self.model_bytes, read, speed, self.load_timeout, self.auto_timeout)
                if advice:
                    log(f"serve: warning: {advice}")
            self.record(state="loading", since=since, read=read, total=self.model_bytes, rate=round(speed),
                        mode=None if runner is None else ("mmap" if runner.mmap else "no-mmap"),
                        idle_s=round(now - last_read_at, 1), **({"warning": advice} if advice else {}))
            if progress is not None and read:
                progress.update(min(read, self.model_bytes))
            if now - last_read_at > STALL_FACTOR * self.load_timeout:
                call.hang_up()
                call.done.wait(5)
                return self._failed(f"ollama neither loaded the model nor gave up after {now - last_read_at:.0f} s "
                                    f"without a byte read ({STALL_FACTOR} x its load timeout of {self.load_timeout} s); "
                                    "the warm-up hung up")
        if progress is not None and read:
            progress.finish()
        status, answer, exc = call.result
        if exc is not None:
            if self.stop.is_set():
                return
            time.sleep(0.5)  # let ollama's last words reach the tail
            died = self.generation() != generation or self._down()
            cause = self.tail.cause()
            if died:
                message = "ollama serve died while loading the model" + (f": {cause}" if cause else "")
            else:
                message = f"the load request failed ({exc})" + (f"; ollama said: {cause}" if cause else "")
            return self._failed(message)
        if status != 200:
            try:
                message = json.loads(answer).get("error") or answer.decode("utf-8", "replace")
            except (ValueError, AttributeError):
                message = answer.decode("utf-8", "replace")
            if advice is None and runner is not None and runner.mmap:
                advice = mmap_advice(self.model_bytes, read, speed, self.load_timeout, self.auto_timeout)
            if advice and "timed out waiting for llama" in message:
                message += f" (HTTP {status}); {advice}"
                return self._failed(message)
            return self._failed(f"{message} (HTTP {status})")
        entry = self._listed_after_load()
        if entry is None:
            if self.stop.is_set():
                return
            return self._failed("ollama answered the load but does not list the model in /api/ps")
        if runner is None:
            runner = loadwatch.find_runner(self.server_pid())
        if runner is not None:
            read = max(read, loadwatch.bytes_read(runner))
        self._loaded(entry, time.monotonic() - started, runner, read)

    def _listed_after_load(self) -> dict | None:
        """The model's /api/ps entry once the load was answered. ollama 0.30+
        lists a model only when its load is done, so a request with other
        options that came in meanwhile (another num_gpu, say) may already be
        loading it again: while a runner lives, wait for the listing rather
        than call the load failed."""
        while True:
            try:
                entry = ps_entry(self.base, self.model)
            except (OSError, ValueError):
                entry = None
            if entry is not None or self.stop.is_set() or not self._runner_alive():
                return entry
            self.stop.wait(1.0)

    def _runner_alive(self) -> bool:
        """Whether a runner of ollama's runs this model (its --model is the
        model's blob; any runner where the store is not known here)."""
        runner = loadwatch.find_runner(self.server_pid())
        if runner is None:
            return False
        blob = loadwatch.model_blob(self.store, self.model) if self.store else None
        try:
            return blob is None or os.path.samefile(runner.model, blob)
        except OSError:
            return False

    def _down(self) -> bool:
        try:
            request(self.base, "GET", "/", timeout=2)
            return False
        except OSError:
            return True

    def _failed(self, message: str) -> None:
        # One line: ollama's cause can span lines (it cuts the runner's output chunk, not a line).
        message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
        self.record(state="failed", error=message)
        log(f"serve: loading {self.model} failed: {message}")


def mmap_advice(total: int, read: int, rate: float, load_timeout: int, auto: bool) -> str | None:
    """With mmap, ollama sees no progress until the whole model is read: when
    the measured rate cannot read it within the load timeout, say what to set
    (serve.read_mb_s when the timeout is auto, else serve.load_timeout)."""
    if rate <= 0 or read >= total:
        return None
    needed = total / rate
    if needed <= load_timeout * 0.9:
        return None
    mb_s = rate / 1e6
    fix = (f"set serve.read_mb_s to {max(1, int(mb_s * 0.8))}" if auto else f"set serve.load_timeout to {math.ceil(needed * 1.25)}")
    return (f"the model is mapped (mmap), so llama.cpp reads all {human_bytes(total)} before ollama sees progress; "
            f"at the {mb_s:.1f} MB/s measured that takes about {needed:.0f} s and ollama gives up after {load_timeout} s: "
            f"{fix} and run `builder up` again")


class LoadCall(threading.Thread):
    """The load request, without a deadline of its own (ollama's stall timer
    decides), on loopback and never through a proxy; `hang_up` closes it."""

    def __init__(self, base: str, body: dict):
        super().__init__(name="load", daemon=True)
        address = urllib.parse.urlsplit(base)
        self.connection = http.client.HTTPConnection(address.hostname, address.port, timeout=None)
        self.body = json.dumps(body).encode()
        self.done = threading.Event()
        self.result: tuple[int | None, bytes, Exception | None] = (None, b"", None)

    def run(self) -> None:
        try:
            self.connection.request("POST", "/api/generate", body=self.body, headers={"Content-Type": "application/json"})
            response = self.connection.getresponse()
            self.result = (response.status, response.read(), None)
        except (OSError, http.client.HTTPException) as exc:
            self.result = (None, b"", exc)
        finally:
            self.connection.close()
            self.done.set()

    def hang_up(self) -> None:
        sock = self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def health_loaded(base: str, model: str) -> tuple[int, dict]:
    """(exit status, state): 0 only while the model is loaded, as both the
    warm-up's record and ollama's /api/ps say."""
    state = read_state()
    if state.get("state") != "loaded":
        return 1, state or {"state": "unknown"}
    try:
        entry = ps_entry(base, model)
    except (OSError, ValueError) as exc:
        return 1, dict(state, state="unknown", error=f"ollama does not answer: {exc}")
    if entry is None:
        return 1, dict(state, state="unloaded")
    return 0, state
