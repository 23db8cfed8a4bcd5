"""The one interface every deploy target offers, so neither the CLI nor
`deploy` needs to know which one it drives: render (files for the context),
check, prepare, up, probe (for the load), down, status, logs. Each step has
a default; a target may decline an operation with a clear message (exit 2).

`ContainerTarget` holds what the engine-driven targets (compose, single)
share: the storage check, the context written and the image built when
stale, the supervisor asked through the engine.
"""

from __future__ import annotations

from pathlib import Path

from builder.errors import ConfigError
from builder.render.blueprint import Blueprint


class Declined(ConfigError):
    """This target does not do that; the message says what to do instead."""


class Target:
    name = ""
    deploys = True  # False: builder renders it, something else runs it
    needs_engine = True  # False: runs as processes here, no container engine
    ram_scope = "machine"  # whose RAM a load gets: "machine" (/proc/meminfo) or "cgroup" (this process's limit too)

    def render(self, blueprint: Blueprint, env) -> dict[str, bytes]:
        """Files this target adds to the build context (beside the image's and compose.yaml)."""
        return {}

    def check(self, blueprint: Blueprint) -> None:
        """What this target needs of the machine, before anything is written."""

    def prepare(self, blueprint: Blueprint, context: Path, config_path: str, settings, engine, force_build: bool, echo) -> None:
        """Everything up runs from: the build context and image, or the staged releases."""
        raise Declined(f"the {self.name} target cannot be brought up by builder")

    def up(self, blueprint: Blueprint, context: Path, engine, echo):
        """Merge, create and serve; return the Endpoint once the model is listed."""
        raise Declined(f"the {self.name} target cannot be brought up by builder")

    def probe(self, blueprint: Blueprint, context: Path, engine):
        """(ask, gone) for `up`'s wait for the load: the supervisor's `health --loaded --json`, and whether serve died."""
        raise Declined(f"the {self.name} target has no supervisor builder can ask")

    def logs_hint(self, blueprint: Blueprint) -> str:
        return "builder logs"

    def down(self, project: str, engine, volumes: bool, config=None) -> str | None:
        """Stop what `up` started; return what happened when it is not simply "removed"."""
        raise Declined(f"the {self.name} target has nothing for builder to stop")

    def status(self, blueprint: Blueprint, engine, lock_sha256: str | None) -> dict:
        raise Declined(f"the {self.name} target has no status builder can read")

    def logs(self, project: str, engine, service: str | None, follow: bool, tail: str, config=None) -> None:
        raise Declined(f"the {self.name} target keeps no logs builder can read")


class ContainerTarget(Target):
    """A target the local container engine runs (compose, single)."""

    def serve_container(self, blueprint: Blueprint, engine) -> str | None:
        """The container whose supervisor loads the model."""
        return None

    def check(self, blueprint: Blueprint) -> None:
        from builder.targets.common import check_storage

        check_storage(blueprint)  # by the containers' user

    def prepare(self, blueprint: Blueprint, context: Path, config_path: str, settings, engine, force_build: bool, echo) -> None:
        """Write the context; build the image when it is stale (or with --build)."""
        from builder.image.build import build_all, image_staleness
        from builder.image.lock import current_lock_digest
        from builder.render.files import write_context
        from builder.targets import context_files

        write_context(context_files(blueprint, self.name), context, blueprint.config.source_date_epoch)
        reason = image_staleness(blueprint, engine.image_labels(blueprint.image), current_lock_digest(config_path))
        if not reason and force_build:
            reason = "--build"
        if reason:
            echo(f"building: {reason}")
            result = build_all(config_path, blueprint, context, engine, settings, False, echo)
            echo(f"built {result.image} {result.image_id}")

    def probe(self, blueprint: Blueprint, context: Path, engine):
        from builder.targets.common import container_probe

        return container_probe(engine, self.serve_container(blueprint, engine))
