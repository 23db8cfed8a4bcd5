"""The one interface every deploy target offers, so the CLI needs to know
none of them: render (files for the context), up, down, status, logs. A
target may decline an operation with a clear message (exit 2)."""

from __future__ import annotations

from pathlib import Path

from builder.errors import ConfigError
from builder.render.blueprint import Blueprint


class Declined(ConfigError):
    """This target does not do that; the message says what to do instead."""


class Target:
    name = ""
    deploys = True  # False: builder renders it, something else runs it
    needs_engine = True  # False: runs as processes here (check, prepare, up_host, probe)

    def render(self, blueprint: Blueprint, env) -> dict[str, bytes]:
        """Files this target adds to the build context (beside the image's and compose.yaml)."""
        return {}

    def up(self, blueprint: Blueprint, context: Path, engine, echo):
        """Merge, create and serve; return the Endpoint once the model is listed."""
        raise Declined(f"the {self.name} target cannot be brought up by builder")

    def serve_container(self, blueprint: Blueprint, engine) -> str | None:
        """The container whose supervisor loads the model (for `up`'s wait)."""
        return None

    def logs_hint(self, blueprint: Blueprint) -> str:
        return "builder logs"

    def down(self, project: str, engine, volumes: bool, config=None) -> None:
        raise Declined(f"the {self.name} target has nothing for builder to stop")

    def status(self, blueprint: Blueprint, engine, lock_sha256: str | None) -> dict:
        raise Declined(f"the {self.name} target has no status builder can read")

    def logs(self, project: str, engine, service: str | None, follow: bool, tail: str, config=None) -> None:
        raise Declined(f"the {self.name} target keeps no logs builder can read")
