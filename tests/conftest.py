"""Shared test fixtures.

Tests marked `engine` need a running Docker engine with buildx and Compose
v2; `.ci/run` starts one. Without an engine they fail rather than skip, so a
green run always means they ran. Deselect them locally with `-m "not engine"`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="Rewrite golden files from the current output.")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Fail loudly (not skip) when the engine the marked tests need is absent."""
    if shutil.which("docker") is None:
        pytest.fail("no docker CLI: run `bash .ci/install-docker.sh` (CI does) or deselect with -m 'not engine'")
    for argv in (["docker", "info"], ["docker", "buildx", "version"], ["docker", "compose", "version"]):
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` failed: {result.stderr.strip()[:300]}; run `bash .ci/install-docker.sh`")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BUILDER_* variable from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("BUILDER_"):
            monkeypatch.delenv(name)
