"""The Docker engine restarted under a running stack: it comes back by its
restart policy. Marked `restarts_engine`: the conftest runs it after every
other test, whatever the file names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import REPO
from tests.engine.conftest import TinyStack, docker

pytestmark = [pytest.mark.engine, pytest.mark.restarts_engine]
PIDFILE = "/var/run/docker.pid"  # where .ci/install-docker.sh has dockerd write its pid


def _ci_dockerd() -> int | None:
    """The dockerd .ci/install-docker.sh started, by its pid file; None once it is gone."""
    try:
        pid = int(open(PIDFILE).read().strip())
        with open(f"/proc/{pid}/comm") as comm:
            return pid if comm.read().strip() == "dockerd" else None
    except (OSError, ValueError):
        return None


def test_stack_comes_back_after_an_engine_restart(tiny_stack: TinyStack) -> None:
    tiny_stack.write_model()
    assert tiny_stack.builder("up").returncode == 0
    pid = _ci_dockerd()
    assert pid, f"this test restarts only the dockerd .ci/install-docker.sh started ({PIDFILE} names no running dockerd)"
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 60
    while os.path.exists(f"/proc/{pid}") and _ci_dockerd() == pid:
        assert time.time() < deadline, "dockerd did not stop"
        time.sleep(0.5)
    restart = subprocess.run(["bash", str(REPO / ".ci" / "install-docker.sh")], capture_output=True, text=True, timeout=600)
    assert restart.returncode == 0, restart.stderr[-2000:]
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{tiny_stack.url}/api/tags", timeout=5) as response:
                if [m["name"] for m in json.loads(response.read())["models"]] == ["tiny:latest"]:
                    break
        except OSError:
            pass
        assert time.time() < deadline, "the stack did not come back after the engine restarted"
        time.sleep(1)
    state = json.loads(docker("inspect", tiny_stack.container("serve")).stdout)[0]["State"]
    assert state["Running"] is True
    # One-shot steps stay done: they are not run again by the restart policy.
    assert json.loads(docker("inspect", tiny_stack.container("merge")).stdout)[0]["State"]["Status"] == "exited"
