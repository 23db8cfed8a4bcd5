"""Errors keep their cause: the engine's (permission denied, no socket) and
the operating system's (disk full, cross-device link), each with the advice
that fits it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from builder.image.build import image_staleness
from builder.errors import engine_error_line, os_error_line
from tests.helpers import run_builder


def test_os_errors_name_the_cause_and_fitting_advice() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/models/tiny/tiny.gguf")
    assert os_error_line(full) == "/models/tiny/tiny.gguf: No space left on device; free some space there (or point the path at a larger disk)"
    cross = OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")
    assert os_error_line(cross) == "/a -> /b: Invalid cross-device link; the two paths are on different filesystems: put them on one"
    denied = PermissionError(errno.EACCES, "Permission denied", "/x")
    assert os_error_line(denied).endswith("check the path's owner and permissions")
    odd = OSError(errno.ENOTSOCK, "Socket operation on non-socket")
    assert os_error_line(odd) == "Socket operation on non-socket"


def test_engine_errors_keep_the_cause() -> None:
    from docker.errors import DockerException

    def chained(cause: BaseException) -> DockerException:
        try:
            try:
                raise cause
            except OSError as inner:
                raise DockerException(f"Error while fetching server API version: {inner}") from inner
        except DockerException as outer:
            return outer

    host = "unix:///var/run/docker.sock"
    denied = engine_error_line(chained(PermissionError(13, "Permission denied")), host)
    assert denied.startswith(f"cannot reach the Docker engine at {host}: permission denied on its socket; add your user to the `docker` group")
    missing = engine_error_line(chained(FileNotFoundError(2, "No such file or directory")), host)
    assert "the socket does not exist (no engine runs); start dockerd" in missing
    refused = engine_error_line(chained(ConnectionRefusedError(111, "Connection refused")), "tcp://127.0.0.1:2")
    assert "connection refused (no engine listens)" in refused


def test_a_missing_engine_socket_is_one_line_with_its_cause(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    (tmp_path / "models").mkdir()
    from builder.sample import write_split_model

    write_split_model(tmp_path / "models" / "tiny", "tiny", 3)
    os.chmod(tmp_path / "models", 0o777)
    os.chmod(tmp_path / "models" / "tiny", 0o777)
    sock = tmp_path / "nothing.sock"
    result = run_builder("status", cwd=tmp_path, env={"DOCKER_HOST": f"unix://{sock}"})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot reach the Docker engine at unix://{sock}: the socket does not exist (no engine runs); start dockerd, or set DOCKER_HOST"
    )


def test_the_sdk_s_own_permission_message_is_recognised() -> None:
    # What docker-py raises for a socket the user may not open (its message
    # wraps requests' error, which wraps the PermissionError).
    from docker.errors import DockerException

    exc = DockerException("Error while fetching server API version: ('Connection aborted.', PermissionError(13, 'Permission denied'))")
    line = engine_error_line(exc, "unix:///var/run/docker.sock")
    assert line.startswith("cannot reach the Docker engine at unix:///var/run/docker.sock: permission denied on its socket")


def test_one_rule_decides_whether_the_image_is_current(tmp_path: Path) -> None:
    from builder import __version__
    from builder.image.build import CONFIG_LABEL, CONTEXT_LABEL, LOCK_LABEL, VERSION_LABEL, image_context_digest
    from builder.config import load_config
    from builder.render.blueprint import make_blueprint

    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    blueprint = make_blueprint(load_config(str(tmp_path / "builder.yaml")))
    current = {CONFIG_LABEL: blueprint.config_digest, VERSION_LABEL: __version__, CONTEXT_LABEL: image_context_digest(blueprint), LOCK_LABEL: "a" * 64}
    assert image_staleness(blueprint, current, "a" * 64) == ""
    assert image_staleness(blueprint, current, None) == ""
    assert image_staleness(blueprint, None, None) == f"{blueprint.image} is not built yet"
    assert "another config" in image_staleness(blueprint, {**current, CONFIG_LABEL: "0" * 64}, None)
    assert image_staleness(blueprint, {**current, VERSION_LABEL: "0.0.1"}, None) == f"{blueprint.image} was built by builder 0.0.1; this is builder {__version__}"
    assert "other templates or supervisor code" in image_staleness(blueprint, {**current, CONTEXT_LABEL: "0" * 64}, None)
    assert "another builder.lock" in image_staleness(blueprint, current, "b" * 64)
