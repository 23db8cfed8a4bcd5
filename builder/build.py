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
