"""The tests' network guard (tests/netguard/) refuses traffic outside loopback
in the processes the tests start, and lets loopback through."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import NETGUARD_DIR
from tests.helpers import run_builder


def test_builder_processes_carry_the_guard() -> None:
    assert str(NETGUARD_DIR) in os.environ["PYTHONPATH"].split(os.pathsep)
    probe = subprocess.run([sys.executable, "-c", "import socket; print(socket._netguard_installed)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "True", probe.stderr


def test_doctor_probing_a_documentation_address_is_refused_before_any_packet(tmp_path: Path) -> None:
    # The preset's NFS placeholder is 192.0.2.10 (TEST-NET-1): doctor would
    # open TCP 2049 there. The guard must stop it inside the builder process.
    assert run_builder("init", "--preset", "deepseek-r1-ud-iq1_m", cwd=tmp_path).returncode == 0
    log = tmp_path / "netguard.log"
    result = run_builder("doctor", cwd=tmp_path, env={"TESTS_NETGUARD_LOG": str(log)})
    assert "fail  nfs-server: 192.0.2.10:2049 does not answer (netguard: refused connect to 192.0.2.10:2049" in result.stdout, result.stdout
    attempts = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(a["kind"], a["target"]) for a in attempts] == [("connect to", "192.0.2.10:2049")]
    assert "builder" in " ".join(attempts[0]["argv"])


def test_name_lookups_outside_loopback_are_refused(tmp_path: Path) -> None:
    log = tmp_path / "netguard.log"
    code = (
        "import socket\n"
        "try:\n    socket.getaddrinfo('github.com', 443)\nexcept socket.gaierror as e:\n    print(e.args[1])\n"
        "print(socket.getaddrinfo('localhost', 80)[0][4][0] in ('127.0.0.1', '::1'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TESTS_NETGUARD_LOG": str(log)})
    assert result.stdout.splitlines()[0].startswith("netguard: refused name lookup of github.com")
    assert result.stdout.splitlines()[1] == "True"
    assert json.loads(log.read_text())["target"] == "github.com"


def test_loopback_passes_the_guard() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        with socket.create_connection(("localhost", port), timeout=5):
            pass


def test_the_pytest_process_is_guarded_too(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "netguard.log"
    monkeypatch.setenv("TESTS_NETGUARD_LOG", str(log))
    sock = socket.socket()
    try:
        try:
            sock.connect(("192.0.2.10", 2049))
        except PermissionError as exc:
            assert str(exc).startswith("netguard: refused connect to 192.0.2.10:2049")
        else:
            raise AssertionError("the guard let a connect to 192.0.2.10 through")
    finally:
        sock.close()
    assert json.loads(log.read_text())["target"] == "192.0.2.10:2049"
