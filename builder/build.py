"""`builder build`: render, fetch, stage, base, then one image build.

The build command is a value (`buildx_argv`), computed purely and run in one
place, so `--dry-run`-style review and tests see exactly what runs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError
from builder.plan import Plan


@dataclass(frozen=True)
class BuildResult:
    image: str
    image_id: str
    reproducible: bool
    context: str


def build_labels(lock_sha256: str) -> dict[str, str]:
    """Labels known only once the artifacts are locked (the rest are in the Dockerfile)."""
    return {"io.builder.lock.sha256": lock_sha256}


def buildx_argv(plan: Plan, context: Path, labels: dict[str, str], iidfile: Path, no_cache: bool) -> list[str]:
    """The `docker buildx build` command for a reproducible image."""
    epoch = str(plan.config.source_date_epoch)
    argv = ["docker", "buildx", "build", "--provenance=false", "--load", "--build-arg", f"SOURCE_DATE_EPOCH={epoch}"]
    for key, value in sorted(labels.items()):
        argv += ["--label", f"{key}={value}"]
    if no_cache:
        argv.append("--no-cache")
    argv += ["--iidfile", str(iidfile), "-t", plan.image, str(context)]
    return argv


def build_image(plan: Plan, context: Path, labels: dict[str, str], no_cache: bool, engine, echo) -> BuildResult:
    """Build with buildx when present (reproducible), else the classic builder."""
    from builder.engine import run_command

    if engine.has_buildx():
        with tempfile.TemporaryDirectory(prefix="builder-iid-") as tmp:
            iidfile = Path(tmp) / "iid"
            argv = buildx_argv(plan, context, labels, iidfile, no_cache)
            echo("$ " + " ".join(argv))
            env = dict(os.environ, SOURCE_DATE_EPOCH=str(plan.config.source_date_epoch))
            result = run_command(argv, env=env, stream=True)
            if result.returncode != 0:
                raise BuilderError(f"docker buildx build failed (exit {result.returncode}); its output is above")
            image_id = iidfile.read_text().strip()
        return BuildResult(plan.image, image_id, True, str(context))
    echo("warning: docker buildx is missing: using the classic builder, whose images are NOT reproducible")
    image_id = engine.classic_build(context, plan.image, labels, {"SOURCE_DATE_EPOCH": str(plan.config.source_date_epoch)}, no_cache, echo)
    return BuildResult(plan.image, image_id, False, str(context))


def build_all(config_path: str, plan: Plan, context: Path, engine, settings, no_cache: bool, echo) -> BuildResult:
    """Render, fetch, stage, make sure of the base, then build."""
    from builder.base import ensure_base
    from builder.fetch import ArtifactCache, fetch_and_lock
    from builder.lock import lock_digest
    from builder.render import render_context, write_context
    from builder.stage import stage

    config = plan.config
    write_context(render_context(plan), context, config.source_date_epoch)
    _artifacts, entries = fetch_and_lock(config_path, config, settings)
    cache = ArtifactCache(settings.cache_dir)
    ollama, llama = entries["ollama"], entries["llama_cpp"]
    staged = stage(
        context, cache.path(ollama.sha256), ollama.sha256, cache.path(llama.sha256), llama.sha256,
        config.llama_cpp.binaries, config.source_date_epoch,
    )
    if staged:
        echo(f"staged {', '.join(staged)} into {context / 'staged'}")
    ensure_base(plan.base, config.source_date_epoch, engine, echo, settings.cache_dir)
    return build_image(plan, context, build_labels(lock_digest(entries)), no_cache, engine, echo)
