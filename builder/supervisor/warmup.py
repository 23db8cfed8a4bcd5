"""Load the model before anyone asks for it, and say how that went.

ollama loads a model at its first request: with a 150 GB model that request
waits minutes, and a model that cannot load (llama.cpp refuses it, the GPUs
run out of memory) fails in front of the first user. The serve role runs a
Warmer beside ollama: once ollama answers, it loads the model the documented
way (`POST /api/generate` with the model and no prompt), records the outcome
in a state file (`health --loaded` and `builder up` read it), and loads it
again whenever ollama restarted or unloaded it. A failed load is not retried
until ollama itself restarts: the same request would fail the same way.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
from collections import deque
from typing import Callable

from .common import human_bytes, log, write_json_atomic
from .ollama import request

STATE_FILE = "builder-serve-state.json"
POLL_SECONDS = 5.0


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
                 generation: Callable[[], int | None], tail: OutputTail):
        super().__init__(name="warmer", daemon=True)
        self.base = base
        self.model = model
        self.keep_alive = keep_alive
        self.load_timeout = load_timeout
        self.stop = stop
        self.generation = generation
        self.tail = tail
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
            if entry is not None:
                if self.state.get("state") != "loaded":
                    self._loaded(entry, self.state.get("load_seconds", 0.0))
                self.stop.wait(POLL_SECONDS)
                continue
            if self.state.get("state") == "failed" and tried == current:
                self.stop.wait(POLL_SECONDS)
                continue
            if self.state.get("state") == "loaded":
                log(f"serve: {self.model} is no longer loaded; loading it again")
            tried = current
            self._load(current)

    def _loaded(self, entry: dict, seconds: float) -> None:
        size, vram = int(entry.get("size", 0)), int(entry.get("size_vram", 0))
        self.record(state="loaded", load_seconds=round(seconds, 3), size=size, size_vram=vram, expires_at=entry.get("expires_at", ""))
        log(f"serve: {self.model} loaded in {seconds:.1f} s ({human_bytes(size)}, {human_bytes(vram)} of it in GPU memory)")

    def _load(self, generation: int) -> None:
        log(f"serve: loading {self.model} (ollama gives up after {self.load_timeout} s without progress)")
        self.record(state="loading", since=time.time())
        started = time.monotonic()
        body = {"model": self.model, "keep_alive": keep_alive_value(self.keep_alive)}
        try:
            status, answer = request(self.base, "POST", "/api/generate", body, timeout=self.load_timeout + 120)
        except (OSError, urllib.error.URLError) as exc:
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
            return self._failed(f"{message} (HTTP {status})")
        try:
            entry = ps_entry(self.base, self.model)
        except (OSError, ValueError):
            entry = None
        if entry is None:
            return self._failed("ollama answered the load but does not list the model in /api/ps")
        self._loaded(entry, time.monotonic() - started)

    def _down(self) -> bool:
        try:
            request(self.base, "GET", "/", timeout=2)
            return False
        except OSError:
            return True

    def _failed(self, message: str) -> None:
        self.record(state="failed", error=message)
        log(f"serve: loading {self.model} failed: {message}")


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
