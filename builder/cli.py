"""The `builder` command line.

Imports here stay light: `builder --help` must not pay for the Docker SDK,
httpx or Jinja2. Each command imports what it needs when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from builder import __version__
from builder.errors import BuilderError, ConfigError

TARGET_NAMES = ("compose", "single", "kubernetes", "host")  # builder.targets.TARGETS, without importing it
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    default="builder.yaml",
    show_default=True,
    envvar="BUILDER_CONFIG",
    type=click.Path(dir_okay=False),
    help="The config file (env: BUILDER_CONFIG).",
)


class Group(click.Group):
    """Turns builder's errors into one line on stderr and the right exit status."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BuilderError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            for line in exc.lines():
                click.echo(f"error: {line}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from builder.errors import os_error_line

            click.echo(f"error: {os_error_line(exc)}", err=True)
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - the engine's, httpx's and escaping errors: one line, not a traceback
            name = type(exc).__module__.split(".")[0]
            if (ctx.obj and ctx.obj.get("debug")) or name not in ("docker", "httpx", "requests", "builder"):
                raise
            click.echo(f"error: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (run with --debug for details)", err=True)
            sys.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="builder")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Turn one YAML file into a reproducible ollama + llama.cpp serving stack
    for huge split GGUF models."""
    ctx.obj = {"debug": debug}


def _load(config_path: str):
    from builder.config import load_config

    return load_config(config_path)


def _preflight(config_path: str, quiet: bool = False, lenient: bool = True):
    """The config through the preflight (num_gpu: auto resolved, memory limits
    derived where the shards can be read), and its render plan."""
    from builder.preflight import assess, blueprint_for

    preflight = assess(_load(config_path), whole=False, lenient=lenient)
    for note in preflight.notes if not quiet else ():
        click.echo(note, err=True)
    return preflight, blueprint_for(preflight)


def _warnings(config) -> list[str]:
    out = []
    import ipaddress

    if not ipaddress.ip_address(config.serve.bind).is_loopback:
        out.append(
            f"serve.bind is {config.serve.bind}: every request needs an API key (serve.auth: keys; `builder keys`), "
            "but nothing encrypts them: put HTTPS in front beyond a trusted network"
        )
    if config.model.template is not None:
        from builder.config.gotemplate import check_template

        out += [f"model.template: {warning}" for warning in check_template(config.model.template)[1]]
    return out


@main.command()
@click.option("--preset", type=click.Choice(preset_names()), required=True, help="The preset to start from.")
@click.option("-o", "--output", default="builder.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(preset: str, output: str, force: bool) -> None:
    """Write a commented config from a preset."""
    from builder.fsutil import write_atomic

    target = Path(output)
    if target.exists() and not force:
        raise ConfigError(f"{output} exists; pass --force to overwrite it or -o to write elsewhere")
    write_atomic(target, (PRESETS_DIR / f"{preset}.yaml").read_bytes())
    click.echo(f"wrote {output} (preset {preset}); edit it, then run `builder validate -c {output}`")


@main.command()
def schema() -> None:
    """Print the config's JSON Schema (for editor completion)."""
    import json

    from builder.config.schema import config_schema

    click.echo(json.dumps(config_schema(), indent=2, sort_keys=True))


@main.command()
@config_option
def validate(config_path: str) -> None:
    """Check a config, including the shard set when the storage is local."""
    from builder.preflight import assess

    config = _load(config_path)
    for warning in _warnings(config):
        click.echo(f"warning: {warning}", err=True)
    preflight = assess(config)
    for note in preflight.notes:
        click.echo(note, err=True)
    if preflight.facts is None:
        click.echo(
            "warning: model.shards: the shards are on NFS and not readable here, so they were not checked "
            "(mount the export and set plan.shards_dir to check them now; the merge step checks them before it writes)",
            err=True,
        )
    elif preflight.fits_in_ram is False:
        click.echo(f"warning: ram: {preflight.ram_line()} (`builder up` refuses this here)", err=True)
    click.echo(f"{config_path}: ok ({config.model.name}, {config.storage.kind} storage, image {config.image})")


@main.command()
@config_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Context folder [default: context/ beside the config].")
@click.option("--target", type=click.Choice(TARGET_NAMES), help="compose, single (adds single/) or kubernetes (adds kubernetes/) [default: the config's target].")
def render(config_path: str, out_dir: str | None, target: str | None) -> None:
    """Write the build context (Dockerfile, compose.yaml, Modelfile, ...) and print its path."""
    from builder.render.files import write_context
    from builder.targets import context_files

    _preflight_config, blueprint = _preflight(config_path)
    config = blueprint.config
    for warning in _warnings(config):
        click.echo(f"warning: {warning}", err=True)
    if (target or config.target) == "kubernetes":
        from builder.targets.kubernetes import kubernetes_manifests

        for note in kubernetes_manifests(blueprint)[1]:
            click.echo(f"note: {note}", err=True)
    files = context_files(blueprint, target or config.target)
    folder = _context_dir(config_path, out_dir)
    write_context(files, folder, config.source_date_epoch)
    click.echo(str(folder))


@main.command()
@config_option
def base(config_path: str) -> None:
    """Make sure the base image exists (bootstrap it from the mirror, or pull it) and print it."""
    from builder.image.base import ensure_base
    from builder.image.engine import DockerEngine
    from builder.image.fetch import cache_root
    from builder.render.blueprint import make_blueprint

    config = _load(config_path)
    blueprint = make_blueprint(config)
    image_id = ensure_base(blueprint.base, config.source_date_epoch, DockerEngine(), _echo_err, cache_root(config))
    click.echo(f"{blueprint.base.image} {image_id}")


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


offline_options = [
    click.option("--offline", is_flag=True, envvar="BUILDER_OFFLINE", help="Fetch nothing: use the cache and --from only (env: BUILDER_OFFLINE)."),
    click.option(
        "--from",
        "carried_dir",
        type=click.Path(file_okay=False, exists=True),
        help="A folder of release archives carried in by hand (named as released).",
    ),
]


def _fetch_settings(config, offline: bool, carried_dir: str | None):
    from builder.image.fetch import FetchSettings, cache_root

    return FetchSettings.from_env(
        cache_root(config), offline=offline, carried_dir=Path(carried_dir) if carried_dir else None, echo=_echo_err
    )


def _context_dir(config_path: str, out_dir: str | None) -> Path:
    return Path(out_dir) if out_dir else Path(config_path).resolve().parent / "context"


def _with_offline_options(function):
    for option in reversed(offline_options):
        function = option(function)
    return function


@main.command()
@config_option
@_with_offline_options
def fetch(config_path: str, offline: bool, carried_dir: str | None) -> None:
    """Download the ollama and llama.cpp release archives into the cache, verified."""
    from builder.image.fetch import ArtifactCache, fetch_and_lock

    config = _load(config_path)
    settings = _fetch_settings(config, offline, carried_dir)
    artifacts, entries = fetch_and_lock(config_path, config, settings)
    cache = ArtifactCache(settings.cache_dir)
    for artifact in artifacts:
        entry = entries[artifact.key]
        click.echo(f"{artifact.key} {entry.sha256} {cache.path(entry.sha256)}")


@main.command()
@config_option
@_with_offline_options
def lock(config_path: str, offline: bool, carried_dir: str | None) -> None:
    """Write builder.lock: the sha256 of each artifact as fetched now (trust on first use)."""
    from builder.image.fetch import fetch_and_lock

    config = _load(config_path)
    fetch_and_lock(config_path, config, _fetch_settings(config, offline, carried_dir), ignore_lock=True)


@main.command()
@config_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Context folder [default: context/ beside the config].")
@click.option("--no-cache", is_flag=True, help="Build every layer again.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--keep-staged", is_flag=True, help="Keep the unpacked releases in the context after the build (removed by default: the image holds them).")
@_with_offline_options
def build(config_path: str, out_dir: str | None, no_cache: bool, as_json: bool, keep_staged: bool, offline: bool, carried_dir: str | None) -> None:
    """Render, fetch, stage and build the image; print its reference and ID."""
    import json

    from builder.image.build import build_all
    from builder.image.engine import DockerEngine

    _config_preflight, blueprint = _preflight(config_path)
    config = blueprint.config
    for warning in _warnings(config):
        _echo_err(f"warning: {warning}")
    context = _context_dir(config_path, out_dir)
    result = build_all(config_path, blueprint, context, DockerEngine(), _fetch_settings(config, offline, carried_dir), no_cache, _echo_err,
                       keep_staged)
    if as_json:
        click.echo(json.dumps({"image": result.image, "id": result.image_id, "reproducible": result.reproducible, "context": result.context}, sort_keys=True))
    else:
        click.echo(f"{result.image} {result.image_id}")


context_option = click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), help="Context folder [default: context/ beside the config]."
)


@main.command()
@config_option
@context_option
@click.option("--build", "force_build", is_flag=True, help="Build the image first even if it exists.")
@click.option("--target", type=click.Choice(TARGET_NAMES), help="compose: three services; single: one container [default: the config's target].")
@click.option("--no-load", is_flag=True, help="Return once the model is listed, without waiting for it to load.")
@_with_offline_options
def up(config_path: str, out_dir: str | None, force_build: bool, target: str | None, no_load: bool, offline: bool, carried_dir: str | None) -> None:
    """Merge, create, serve: bring the stack up and wait until the model is loaded."""
    from builder.targets import deploy

    config = _load(config_path)
    for warning in _warnings(config):
        _echo_err(f"warning: {warning}")
    deployed = deploy(config, config_path, _context_dir(config_path, out_dir), target or config.target, force_build, no_load,
                      _fetch_settings(config, offline, carried_dir), _echo_err)
    if deployed.load:
        _echo_err(f"load: {deployed.load}")
    click.echo(f"{deployed.url} serves {deployed.model}")


@main.command()
@config_option
@click.option("--target", type=click.Choice(TARGET_NAMES), help="[default: the config's target]")
@click.option("--volumes", is_flag=True, help="Also remove the volume definition (the model files stay where they are).")
def down(config_path: str, target: str | None, volumes: bool) -> None:
    """Stop and remove the stack's containers."""
    from builder.targets import engine_for, get_target, project_and_target

    project, name, config = project_and_target(config_path, target)
    chosen = get_target(name)
    said = chosen.down(project, engine_for(chosen), volumes, config)
    click.echo(said or f"stack {project} removed" + (" (volume definition too; model files untouched)" if volumes else ""))


@main.command()
@config_option
@context_option
@click.option("--target", type=click.Choice(TARGET_NAMES), help="[default: the config's target]")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(config_path: str, out_dir: str | None, target: str | None, as_json: bool) -> None:
    """Each service's state, the model, the endpoint, the image (reads only)."""
    import json

    from builder.targets import engine_for, get_target, lock_sha256

    del out_dir  # nothing is rendered: kept so scripts that pass --out keep working
    _status_preflight, blueprint = _preflight(config_path, quiet=True)
    chosen = get_target(target or blueprint.config.target)
    report = chosen.status(blueprint, engine_for(chosen), lock_sha256(config_path))
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        from builder.targets.status import status_lines

        click.echo("\n".join(status_lines(report)))


@main.command()
@config_option
@click.argument("service", required=False, type=click.Choice(["merge", "create", "serve"]))
@click.option("--target", type=click.Choice(TARGET_NAMES), help="[default: the config's target]")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--tail", default="all", show_default=True, help="Lines from the end of each log.")
def logs(config_path: str, service: str | None, target: str | None, follow: bool, tail: str) -> None:
    """Show the logs of one service or all."""
    from builder.targets import engine_for, get_target, project_and_target

    project, name, config = project_and_target(config_path, target)
    chosen = get_target(name)
    chosen.logs(project, engine_for(chosen), service, follow, tail, config)


@main.command("sample-model")
@config_option
@click.option("--force", is_flag=True, help="Overwrite shards that are already there.")
def sample_model(config_path: str, force: bool) -> None:
    """Write a tiny real split model where the config's shards should be (local storage only), to try the stack out."""
    from builder.sample import write_sample_for

    folder, written = write_sample_for(_load(config_path), force)
    click.echo(f"wrote {written} shards of a tiny sample model to {folder}")


@main.command("plan")
@config_option
@click.option("--shards", "shards_dir", type=click.Path(file_okay=False, exists=True), help="Where to read the shards here (overrides plan.shards_dir).")
@click.option("--gpu-memory", help="Each GPU's memory in GiB, comma-separated (overrides plan.gpu_memory_gib and nvidia-smi).")
@click.option("--num-ctx", type=click.IntRange(min=1), help="Context size (default: model.parameters.num_ctx, else 2048).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(config_path: str, shards_dir: str | None, gpu_memory: str | None, num_ctx: int | None, as_json: bool) -> None:
    """How many layers fit on the GPUs, layer by layer, from the shards' GGUF headers."""
    import json

    from builder.preflight import assess, with_gpu_memory
    from builder.preflight.report import offload_report, parse_gpu_memory

    config = with_gpu_memory(_load(config_path), parse_gpu_memory(gpu_memory))
    preflight = assess(config, Path(shards_dir) if shards_dir else None, whole=False, gpus_required=True,
                       cgroup=config.target == "host")
    report = offload_report(preflight, num_ctx)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        click.echo("\n".join(report.lines()))


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(config_path: str, as_json: bool) -> None:
    """Check this machine for the stack: engine, plugins, GPUs, storage, shards, image."""
    import json

    from builder.targets.doctor import FAIL, run_checks
    from builder.image.lock import lock_digest, lock_path, read_lock
    from builder.render.blueprint import make_blueprint

    config = _load(config_path)
    entries = read_lock(lock_path(config_path))
    checks = run_checks(config, make_blueprint(config), lock_digest(entries) if entries else None)
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for check in checks:
            click.echo(check.line())
    if any(c.status == FAIL for c in checks):
        sys.exit(1)


@main.command("export")
@config_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Archive to write [default: NAME-TAG.tar.gz].")
def export_command(config_path: str, output: str | None) -> None:
    """Write the image to a compressed archive, with its sha256 beside it, for machines without a registry."""
    from builder.image.airgap import default_archive_name, export_image
    from builder.image.engine import DockerEngine

    config = _load(config_path)
    out = Path(output or default_archive_name(config.image))
    digest = export_image(DockerEngine(), config.image, out, _echo_err)
    click.echo(f"{out} sha256:{digest}")


@main.command("import")
@click.argument("archive", type=click.Path(dir_okay=False))
def import_command(archive: str) -> None:
    """Load an exported image (checked against ARCHIVE.sha256 when it is there)."""
    from builder.image.airgap import import_image
    from builder.image.engine import DockerEngine

    for line in import_image(DockerEngine, Path(archive), _echo_err):
        click.echo(line)


@main.command()
@config_option
@click.argument("target")
def push(config_path: str, target: str) -> None:
    """Tag the image as TARGET (REGISTRY/REPO[:TAG]) and push it; credentials come from your Docker config."""
    from builder.image.airgap import push_target
    from builder.image.engine import DockerEngine

    config = _load(config_path)
    engine = DockerEngine()
    if engine.image_id(config.image) is None:
        raise BuilderError(f"{config.image} is not in the engine; build it first (builder build)")
    full = push_target(target, config.registry_mirror)
    digest = engine.push(config.image, full, _echo_err)
    click.echo(f"{full}@{digest}" if digest else full)


from builder.cli_keys import keys  # noqa: E402 - its own module; it needs main's helpers above

main.add_command(keys)
