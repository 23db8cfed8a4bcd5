"""The container engine behind one small interface.

Everything builder asks of Docker goes through here: the Docker SDK for
images, the `docker buildx` and `docker compose` CLIs for builds and stacks.
A second engine plugs in by offering the same methods.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from builder.errors import BuilderError


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run_command(argv: Sequence[str], env: dict[str, str] | None = None, stream: bool = False) -> CommandResult:
    """Run one command; with `stream`, its output goes straight to the terminal."""
    if shutil.which(argv[0]) is None:
        raise BuilderError(f"`{argv[0]}` is not installed or not on PATH (needed for: {' '.join(argv[:3])})")
    # No stdin: a tool that would ask a question (Compose's "recreate volume?")
    # must fail rather than hang with its prompt hidden.
    if stream:
        completed = subprocess.run(list(argv), env=env, text=True, stdin=subprocess.DEVNULL)
        return CommandResult(tuple(argv), completed.returncode, "", "")
    completed = subprocess.run(list(argv), env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return CommandResult(tuple(argv), completed.returncode, completed.stdout, completed.stderr)


class DockerEngine:
    """The Docker engine: SDK for image queries and loads, CLIs for the rest."""

    def __init__(self) -> None:
        import os

        import docker
        from docker.errors import DockerException

        from builder.errors import engine_error_line

        host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        try:
            self._client = docker.from_env()
            self._client.ping()
        except DockerException as exc:
            raise BuilderError(engine_error_line(exc, host)) from None

    def info(self) -> dict:
        """The engine's `docker info`."""
        return dict(self._client.info())

    def plugin_version(self, plugin: str) -> str | None:
        """The first line of `docker PLUGIN version` (buildx, compose), or None when missing."""
        if shutil.which("docker") is None:
            return None
        args = ["docker", plugin, "version"] + (["--short"] if plugin == "compose" else [])
        result = run_command(args)
        return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None

    def image_labels(self, ref: str) -> dict[str, str] | None:
        """The labels of image `ref`, or None when the engine does not have it."""
        from docker.errors import ImageNotFound

        try:
            return dict(self._client.images.get(ref).labels or {})
        except ImageNotFound:
            return None

    def image_id(self, ref: str) -> str | None:
        """The ID of image `ref`, or None when the engine does not have it."""
        from docker.errors import ImageNotFound

        try:
            return self._client.images.get(ref).id
        except ImageNotFound:
            return None

    def image_size(self, ref: str) -> int:
        """The image's size in bytes, as `docker image inspect` reports it (0 when unknown)."""
        from docker.errors import ImageNotFound

        try:
            return int(self._client.images.get(ref).attrs.get("Size") or 0)
        except ImageNotFound:
            return 0

    def load(self, archive: Path) -> None:
        """Load a `docker load` archive."""
        with archive.open("rb") as handle:
            self._client.images.load(handle)

    def pull(self, ref: str, echo=lambda message: None) -> str:
        """Pull `ref` (a reference pinned by digest), reporting each layer's
        progress, and return its image ID."""
        import sys

        from docker.errors import APIError

        repository, _, digest = ref.partition("@")
        tty = sys.stderr.isatty()
        try:
            for event in self._client.api.pull(repository, tag=digest or None, stream=True, decode=True):
                if "error" in event:
                    raise BuilderError(f"cannot pull {ref}: {event['error']}; check mirrors.registry or load the image by hand")
                status, layer = event.get("status", ""), event.get("id", "")
                if status in ("Downloading", "Extracting"):
                    if tty:
                        sys.stderr.write(f"\r{layer} {status.lower()} {event.get('progress', '')}\033[K")
                        sys.stderr.flush()
                    continue
                echo(f"{layer}: {status}" if layer else status)
        except APIError as exc:
            raise BuilderError(
                f"cannot pull {ref}: {exc.explanation or exc}; check mirrors.registry or load the image by hand"
            ) from None
        image_id = self.image_id(ref)
        if image_id is None:
            raise BuilderError(f"pulled {ref}, but the engine does not list it")
        return image_id

    def save(self, ref: str):
        """The `docker save` archive of `ref`, in chunks."""
        return self._client.images.get(ref).save(chunk_size=1 << 20, named=True)

    def load_stream(self, stream) -> list[str]:
        """Load a `docker save` archive from a file object; return 'name id' per image."""
        from docker.errors import APIError

        try:
            images = self._client.images.load(stream)
        except APIError as exc:
            raise BuilderError(f"docker load failed: {exc.explanation or exc}") from None
        return [f"{(image.tags or ['<untagged>'])[0]} {image.id}" for image in images]

    def push(self, source: str, target: str, echo) -> str:
        """Tag `source` as `target` and push it; return the pushed digest."""
        from docker.errors import APIError

        repository, _, tag = target.rpartition(":")
        try:
            self._client.images.get(source).tag(repository, tag)
            digest = ""
            for event in self._client.api.push(repository, tag=tag, stream=True, decode=True):
                if "error" in event:
                    raise BuilderError(f"cannot push {target}: {event['error']}; check the registry and `docker login`")
                status = event.get("status", "")
                if status in ("Pushing", "Preparing", "Waiting"):
                    continue
                if "aux" in event and isinstance(event["aux"], dict):
                    digest = event["aux"].get("Digest", digest)
                echo(f"{event.get('id', '')}: {status}".lstrip(": ") if status else str(event))
        except APIError as exc:
            raise BuilderError(f"cannot push {target}: {exc.explanation or exc}; check the registry and `docker login`") from None
        return digest

    def container(self, name: str) -> dict | None:
        """State and labels of container `name`, or None when there is none."""
        from docker.errors import NotFound

        try:
            attrs = self._client.containers.get(name).attrs
        except NotFound:
            return None
        state = attrs.get("State", {})
        return {
            "status": state.get("Status"),
            "exit_code": state.get("ExitCode"),
            "health": (state.get("Health") or {}).get("Status"),
            "labels": attrs.get("Config", {}).get("Labels") or {},
        }

    def service_container(self, project: str, service: str) -> str | None:
        """The ID of a Compose service's container, found by its labels."""
        found = self._client.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={project}", f"com.docker.compose.service={service}",
        ]})
        return found[0].id if found else None

    def exec_in(self, container: str, argv: list[str]) -> tuple[int, str]:
        """Run `argv` inside a running container: (exit status, output)."""
        from docker.errors import APIError, NotFound

        try:
            result = self._client.containers.get(container).exec_run(argv, demux=False)
        except (NotFound, APIError) as exc:
            return 125, str(exc)
        return result.exit_code, (result.output or b"").decode("utf-8", "replace")

    def container_logs(self, name: str, tail: int | str = 15) -> str:
        return self._client.containers.get(name).logs(tail=tail).decode("utf-8", "replace")

    def remove_container(self, name: str) -> None:
        from docker.errors import NotFound

        try:
            self._client.containers.get(name).remove(force=True)
        except NotFound:
            pass

    def prune_context_copies(self) -> None:
        """Drop BuildKit's copies of build contexts (`local source for context`,
        about the staged releases' size each): the image holds what they held.
        Only caches of contexts go; image layers and other build cache stay."""
        run_command(["docker", "buildx", "prune", "--force", "--filter", "type=source.local"])

    def has_buildx(self) -> bool:
        return shutil.which("docker") is not None and run_command(["docker", "buildx", "version"]).returncode == 0

    def classic_build(self, context: Path, tag: str, labels: dict[str, str], buildargs: dict[str, str], no_cache: bool, echo) -> str:
        """The SDK's classic build, streamed line by line; returns the image ID."""
        from docker.errors import APIError, BuildError

        try:
            stream = self._client.api.build(
                path=str(context), tag=tag, labels=labels, buildargs=buildargs, nocache=no_cache, rm=True, decode=True
            )
            for chunk in stream:
                if "error" in chunk:
                    raise BuilderError(f"docker build failed: {chunk['error'].strip()}")
                text = chunk.get("stream", "").rstrip()
                if text:
                    echo(text)
        except (APIError, BuildError) as exc:
            raise BuilderError(f"docker build failed: {exc}") from None
        image_id = self.image_id(tag)
        if image_id is None:
            raise BuilderError(f"docker build finished but {tag} is not in the engine")
        return image_id

    def volume_options(self, name: str) -> dict[str, str] | None:
        """The driver options of volume `name`, or None when there is none."""
        from docker.errors import NotFound

        try:
            return dict(self._client.volumes.get(name).attrs.get("Options") or {})
        except NotFound:
            return None

    def remove_volume(self, name: str) -> None:
        from docker.errors import APIError

        try:
            self._client.volumes.get(name).remove()
        except APIError as exc:
            raise BuilderError(f"cannot remove the volume {name}: {exc.explanation or exc}; `builder down` first") from None

    def compose(self, compose_file: Path, *args: str, stream: bool = False) -> CommandResult:
        return run_command(compose_argv(compose_file, *args), stream=stream)

    def compose_project(self, project: str, *args: str, stream: bool = False) -> CommandResult:
        """Compose by project name alone (down, logs): no file, no config needed."""
        return run_command(["docker", "compose", "--ansi", "never", "-p", project, *args], stream=stream)


def compose_argv(compose_file: Path, *args: str) -> list[str]:
    return ["docker", "compose", "--ansi", "never", "-f", str(compose_file), *args]
