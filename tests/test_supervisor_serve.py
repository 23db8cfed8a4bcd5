"""The supervisor's serve role on the host: bounded restarts and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO


def start(tmp_path: Path, script: str, delay: str = "0.5") -> subprocess.Popen:
    ollama = tmp_path / "ollama"
    ollama.write_text("#!/bin/sh\n" + script)
    ollama.chmod(0o755)
    runtime = tmp_path / "runtime.json"
    runtime.write_text(json.dumps({"ollama": str(ollama), "port": 1}))
    env = dict(os.environ, BUILDER_RUNTIME=str(runtime), PYTHONPATH=str(REPO / "builder"), BUILDER_RESTART_DELAY=delay)
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def read_until(process: subprocess.Popen, needle: str, seconds: float = 20) -> list[str]:
    lines = []
    deadline = time.time() + seconds
    assert process.stdout is not None
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r} in {lines}")


def test_gives_up_after_bounded_restarts(tmp_path: Path) -> None:
    process = start(tmp_path, "exit 3\n", delay="0.01")
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    assert out.count("supervisor: serve: starting") == 6
    assert "restart 5 of 5" in out
    assert "ollama serve died 6 times in a row (last exit 3); giving up" in out


def test_sigterm_during_backoff_stops_at_once(tmp_path: Path) -> None:
    # A back-off of 600 s: a supervisor that sat it out would outlast the
    # 60 s wait below by far, whatever this machine's speed (no wall-clock bound).
    process = start(tmp_path, "exit 3\n", delay="600")
    read_until(process, "restart 1 of 5")
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the supervisor waited out its back-off instead of stopping on SIGTERM") from None
    assert process.returncode == 0
    assert "serve: starting" not in out, "no new ollama after the signal"
    assert "stopped by signal 15" in out


def test_sigterm_reaches_ollama_and_its_children(tmp_path: Path) -> None:
    marker = tmp_path / "runner.pid"
    # ollama starts a "runner" child of its own, then waits.
    process = start(tmp_path, f"sleep 300 & echo $! > {marker}\nwait\n")
    read_until(process, "serve: starting")
    deadline = time.time() + 10
    while not marker.exists() or not marker.read_text().strip():
        assert time.time() < deadline
        time.sleep(0.05)
    runner = int(marker.read_text())
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=10)
    assert process.returncode == 0
    time.sleep(0.2)
    try:
        os.kill(runner, 0)
        alive = Path(f"/proc/{runner}/stat").read_text().split()[2] != "Z"
    except ProcessLookupError:
        alive = False
    assert not alive, "the runner must not outlive the supervisor"
