"""Shared test fixtures.

Tests marked `engine` need a running Docker engine with buildx and Compose
v2; `.ci/run` starts one. Without an engine they fail rather than skip, so a
green run always means they ran. Deselect them locally with `-m "not engine"`.

The network guard (`tests/netguard/`) is active in pytest's process and in
every Python process the tests start: a connection or name lookup outside
loopback is refused, and fails the test during which it was attempted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NETGUARD_DIR = REPO / "tests" / "netguard"
NETGUARD_LOG_ENV = "TESTS_NETGUARD_LOG"


def _start_netguard() -> Path:
    """Guard this process and, through PYTHONPATH, every Python it starts."""
    log = Path(tempfile.mkstemp(prefix="netguard-", suffix=".log")[1])
    os.environ[NETGUARD_LOG_ENV] = str(log)
    path = [str(NETGUARD_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    import importlib.util

    spec = importlib.util.spec_from_file_location("tests_netguard", NETGUARD_DIR / "sitecustomize.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # installs itself
    return log


NETGUARD_LOG = _start_netguard()
# The compiled llama.cpp tools are cached outside the clone; pin the folder
# now, so a test that changes HOME does not send the fixture to build again.
os.environ.setdefault(
    "BUILDER_TEST_CACHE", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "builder-tests")
)


@pytest.fixture(autouse=True)
def _netguard_watch():
    """Fail the test during which any guarded process tried to leave loopback."""
    before = NETGUARD_LOG.stat().st_size
    yield
    with open(NETGUARD_LOG, encoding="utf-8") as log:
        log.seek(before)
        attempts = log.read().strip()
    if attempts:
        pytest.fail(f"traffic outside loopback was attempted (refused by the network guard):\n{attempts}", pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that restart the engine run after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("restarts_engine") is not None)


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
