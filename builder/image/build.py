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
from builder.render.blueprint import Blueprint


@dataclass(frozen=True)
class BuildResult:
    image: str
    image_id: str
    reproducible: bool
    context: str


LOCK_LABEL = "io.builder.lock.sha256"
CONTEXT_LABEL = "io.builder.context.sha256"
CONFIG_LABEL = "io.builder.config.sha256"
VERSION_LABEL = "io.builder.builder.version"


def build_labels(lock_sha256: str, context_sha256: str) -> dict[str, str]:
    """Labels known only at build time (the rest are in the Dockerfile): the
    lock's digest and the digest of what the image is made of besides the
    release archives (Dockerfile, Modelfile, runtime.json, supervisor code)."""
    return {LOCK_LABEL: lock_sha256, CONTEXT_LABEL: context_sha256}


def image_context_digest(blueprint: Blueprint) -> str:
    """sha256 over the rendered files that go into the image (not staged/,
    which the lock covers): changes with the config, the templates and
    builder's own supervisor code, so an upgraded builder rebuilds."""
    import hashlib

    from builder.render.blueprint import ROOTFS
    from builder.render.files import render_context

    digest = hashlib.sha256()
    for name, data in render_context(blueprint).items():
        if name == "Dockerfile" or name.startswith(f"{ROOTFS}/"):
            digest.update(f"{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def image_staleness(blueprint: Blueprint, labels: dict[str, str] | None, lock_sha256: str | None) -> str:
    """Why the image must be built again ("" when it is current): the one
    rule `up`, `status` and `doctor` share."""
    from builder import __version__

    if labels is None:
        return f"{blueprint.image} is not built yet"
    if labels.get(CONFIG_LABEL) != blueprint.config_digest:
        return f"{blueprint.image} was built from another config (its Modelfile and plan are in the image)"
    if labels.get(VERSION_LABEL) != __version__:
        return f"{blueprint.image} was built by builder {labels.get(VERSION_LABEL) or 'unknown'}; this is builder {__version__}"
    if labels.get(CONTEXT_LABEL) != image_context_digest(blueprint):
        return f"{blueprint.image} was built from other templates or supervisor code than this builder renders"
    if lock_sha256 and labels.get(LOCK_LABEL) != lock_sha256:
        return f"{blueprint.image} was built from another builder.lock (other release archives)"
    return ""


def buildx_argv(blueprint: Blueprint, context: Path, labels: dict[str, str], iidfile: Path, no_cache: bool) -> list[str]:
    """The `docker buildx build` command for a reproducible image."""
    epoch = str(blueprint.config.source_date_epoch)
    argv = ["docker", "buildx", "build", "--provenance=false", "--load", "--build-arg", f"SOURCE_DATE_EPOCH={epoch}"]
    for key, value in sorted(labels.items()):
        argv += ["--label", f"{key}={value}"]
    if no_cache:
        argv.append("--no-cache")
    argv += ["--iidfile", str(iidfile), "-t", blueprint.image, str(context)]
    return argv


def build_image(blueprint: Blueprint, context: Path, labels: dict[str, str], no_cache: bool, engine, echo) -> BuildResult:
    """Build with buildx when present (reproducible), else the classic builder."""
    from builder.image.engine import run_command

    if engine.has_buildx():
        with tempfile.TemporaryDirectory(prefix="builder-iid-") as tmp:
            iidfile = Path(tmp) / "iid"
            argv = buildx_argv(blueprint, context, labels, iidfile, no_cache)
            echo("$ " + " ".join(argv))
            env = dict(os.environ, SOURCE_DATE_EPOCH=str(blueprint.config.source_date_epoch))
            result = run_command(argv, env=env, stream=True)
            if result.returncode != 0:
                raise BuilderError(f"docker buildx build failed (exit {result.returncode}); its output is above")
            image_id = iidfile.read_text().strip()
        return BuildResult(blueprint.image, image_id, True, str(context))
    echo("warning: docker buildx is missing: using the classic builder, whose images are NOT reproducible")
    image_id = engine.classic_build(context, blueprint.image, labels, {"SOURCE_DATE_EPOCH": str(blueprint.config.source_date_epoch)}, no_cache, echo)
    return BuildResult(blueprint.image, image_id, False, str(context))


def fetch_needs(config_path: str, config, cache_dir: Path) -> list:
    """The download cache: the archives builder.lock records that the cache lacks."""
    from builder.image.fetch import ArtifactCache, plan_artifacts
    from builder.image.lock import lock_path, read_lock
    from builder.preflight.disk import Need

    cache = ArtifactCache(cache_dir)
    locked = read_lock(lock_path(config_path))
    needs = []
    for artifact in plan_artifacts(config):
        entry = locked.get(artifact.key)
        if entry is not None and entry.url == artifact.url and not cache.path(entry.sha256).is_file():
            needs.append(Need(f"download of {artifact.filename}", cache.root, entry.size))
    return needs


def stage_needs(staged_root: Path, archives: list[Path], already: bool) -> list:
    """The staged trees under `staged_root` (a build context, the host prefix):
    the archives unpacked, unless they are staged already."""
    from builder.preflight.disk import Need

    if already:
        return []
    from builder.image.stage import unpacked_size

    return [Need("staged releases", staged_root, sum(unpacked_size(a) for a in archives))]


def fetch_and_stage(config_path: str, config, root: Path, settings, data_root: str | None, base_missing: bool, echo) -> dict:
    """Fetch the release archives into the cache and stage them under `root`
    (a build context, the host target's prefix), each disk checked first:
    the cache before the fetch, `root` and the engine's data root before the
    stage. Returns the lock entries."""
    from builder.image.fetch import ArtifactCache, fetch_and_lock
    from builder.image.stage import is_staged, stage, unpacked_size
    from builder.preflight.disk import check_space, engine_needs
    from builder.render.blueprint import STAGED_LLAMA_CPP, STAGED_OLLAMA

    for line in check_space(fetch_needs(config_path, config, settings.cache_dir)):
        echo(line)
    _artifacts, entries = fetch_and_lock(config_path, config, settings)
    cache = ArtifactCache(settings.cache_dir)
    ollama, llama = entries["ollama"], entries["llama_cpp"]
    epoch, binaries = config.source_date_epoch, config.llama_cpp.binaries
    pending = [cache.path(ollama.sha256)] if not is_staged(root, STAGED_OLLAMA, ollama.sha256, (), epoch) else []
    if not is_staged(root, STAGED_LLAMA_CPP, llama.sha256, binaries, epoch):
        pending.append(cache.path(llama.sha256))
    needs = stage_needs(root, pending, not pending)
    staged_bytes = sum(unpacked_size(cache.path(e.sha256)) for e in (ollama, llama))
    for line in check_space(needs + engine_needs(data_root, staged_bytes, base_missing)):
        echo(line)
    staged = stage(root, cache.path(ollama.sha256), ollama.sha256, cache.path(llama.sha256), llama.sha256, binaries, epoch)
    if staged:
        echo(f"staged {', '.join(staged)} into {root / 'staged'}")
    return entries


def build_all(config_path: str, blueprint: Blueprint, context: Path, engine, settings, no_cache: bool, echo,
              keep_staged: bool = False) -> BuildResult:
    """Render, fetch, stage, make sure of the base, then build. The staged
    release trees, and BuildKit's copy of them, are removed once the image
    holds them (`keep_staged` keeps them): after a build only the download
    cache and the image stay on disk."""
    import shutil

    from builder.image.base import ensure_base
    from builder.image.lock import lock_digest
    from builder.render.files import write_context, render_context

    config = blueprint.config
    write_context(render_context(blueprint), context, config.source_date_epoch)
    data_root = engine.info().get("DockerRootDir")
    base_missing = engine.image_id(blueprint.base.image) is None
    entries = fetch_and_stage(config_path, config, context, settings, data_root, base_missing, echo)
    ensure_base(blueprint.base, config.source_date_epoch, engine, echo, settings.cache_dir)
    result = build_image(blueprint, context, build_labels(lock_digest(entries), image_context_digest(blueprint)), no_cache, engine, echo)
    if not keep_staged:
        shutil.rmtree(context / "staged", ignore_errors=True)
        if result.reproducible:  # buildx: its copy of the context goes too
            engine.prune_context_copies()
    return result
