"""Helpers the tests share: running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_builder(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `builder ARGS` in a subprocess, the way a user's shell does."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "builder", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def registry_client_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a package registry's own client (pip): the
    tests' network guard (tests/netguard/) left out, since those are the only
    hosts outside loopback the tests may reach."""
    env = dict(os.environ if env is None else env)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).name != "netguard"]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    env.pop("TESTS_NETGUARD_LOG", None)
    return env


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes, to prove nothing was touched."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
