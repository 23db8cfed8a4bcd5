"""Deploy targets, one module each behind one interface (targets/base.py),
found by name. Adding a target is adding a module here and its name below;
the CLI only dispatches.

Also the orchestration every target shares: load and render the config,
check the shards before anything is written, rebuild a stale image, bring
the target up, wait for the model to load.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from builder.errors import BuilderError, ConfigError, Problem
from builder.targets.base import Declined, Target  # noqa: F401 - the interface, for callers

TARGETS = ("compose", "single", "kubernetes", "host")


def get_target(name: str, source: str | None = None) -> Target:
    """The target called `name`; an unknown name is one clear line (exit 2)."""
    if name not in TARGETS:
        message = f"'{name}' is not a deploy target; choose one of {', '.join(TARGETS)}"
        raise ConfigError(Problem("target", message, None, source) if source else f"target: {message}")
    return importlib.import_module(f"builder.targets.{name}").TARGET


def context_files(blueprint, target: str) -> dict[str, bytes]:
    """Every file of the build context for `target`: the image's files and
    compose.yaml (every context has them), then the target's own."""
    from builder.render.files import environment, render_context

    files = render_context(blueprint)
    files.update(get_target(target, blueprint.config.source).render(blueprint, environment()))
    return dict(sorted(files.items()))


@dataclass(frozen=True)
class Deployed:
    url: str
    model: str
    load: str | None  # the load's one-line report, or None with --no-load


def lock_sha256(config_path: str) -> str | None:
    """The digest of builder.lock beside the config, if there is one."""
    from builder.image.lock import current_lock_digest

    return current_lock_digest(config_path)


def deploy(config, config_path: str, context: Path, target_name: str, force_build: bool, no_load: bool,
           fetch_settings, echo: Callable[[str], None]) -> Deployed:
    """`builder up`, the same straight line for every target: the preflight
    (the shards read once, num_gpu resolved, RAM checked) before anything is
    written, built or merged; then check, prepare, up, and wait for the load."""
    from builder.preflight import assess, blueprint_for, check_ram

    target = get_target(target_name, config.source)
    preflight = assess(config, cgroup=target.ram_scope == "cgroup")
    for note in preflight.notes:
        echo(note)
    if target.deploys:
        check_ram(preflight)
        if preflight.facts is not None:
            from builder.preflight.where import slow_volume_warning
            from builder.targets.status import remember_rate

            slow, rate = slow_volume_warning(preflight.config, preflight.facts.file_bytes)
            if rate is not None:
                remember_rate(config, rate)
            if slow:
                echo(f"warning: {slow}")
    blueprint = blueprint_for(preflight)
    target.check(blueprint)
    if target.deploys:
        from builder.preflight.disk import check_space, model_cache_needs

        for line in check_space(model_cache_needs(config, preflight.facts), move="storage.model_cache"):
            echo(f"model cache: {line.removeprefix('space: ')}")
    if target.deploys:
        from builder.targets.keys import ensure_keys

        ensure_keys(blueprint, target_name, echo)
    engine = engine_for(target) if target.deploys else None
    target.prepare(blueprint, context, config_path, fetch_settings, engine, force_build, echo)
    endpoint = target.up(blueprint, context, engine, echo)
    return _loaded(preflight, blueprint, target, endpoint, target.probe(blueprint, context, engine), no_load, echo)


def _loaded(preflight, blueprint, target, endpoint, probe, no_load: bool, echo) -> Deployed:
    """Wait for the supervisor's warm-up, unless --no-load."""
    from dataclasses import replace

    from builder.targets.common import LoadFailed, describe_load, wait_for_load
    from builder.targets.status import runner_gpu_memory

    config = preflight.config
    if no_load:
        return Deployed(endpoint.url, endpoint.model, None)
    try:
        load = wait_for_load(blueprint, probe, echo, sys.stderr.isatty())
    except LoadFailed as exc:
        raise BuilderError(load_failure(preflight, str(exc), target.logs_hint(blueprint))) from None
    return Deployed(endpoint.url, endpoint.model, describe_load(blueprint, replace(load, gpu_held=runner_gpu_memory(config))))


OOM_MARKERS = ("out of memory", "cudaMalloc failed", "CUDA error")


def load_failure(preflight, cause: str, logs: str) -> str:
    """`up`'s one line for a load that failed. Out of GPU memory: what was
    tried, what to set (the plan for the GPUs here), then ollama's words."""
    config = preflight.config
    name = config.model.name
    if not any(marker in cause for marker in OOM_MARKERS):
        return f"{name} did not load: {cause}; the stack is left up for `{logs}`"
    from builder.preflight.sizing import plan_for

    used = dict(config.model.parameters).get("num_gpu")
    auto = any(note.startswith("num_gpu: auto") for note in preflight.notes)
    tried = f" with num_gpu {used}{' (auto)' if auto else ''}" if used is not None else ""
    if preflight.facts is None or not preflight.gpu_memory:
        fix = "run `builder plan` and set model.parameters.num_gpu lower"
    else:
        planned = plan_for(config, preflight.facts.shape, list(preflight.gpu_memory)).num_gpu
        if auto or not isinstance(used, int) or used <= planned:
            fix = (f"the plan ({planned} layers) did not fit here: something else took GPU memory since, or the plan is wrong "
                   f"(`builder plan` shows what it planned from); raise plan.margin_gib or set model.parameters.num_gpu below {used}")
        else:
            fix = f"set model.parameters.num_gpu to {planned} (or auto), what `builder plan` fits on the GPUs here"
    said = cause if len(cause) <= 300 else cause[:297] + "..."
    return f"{name} did not load{tried}: out of GPU memory. Fix: {fix}. The stack is left up for `{logs}`. ollama said: {said}"


def project_and_target(config_path: str, flag: str | None) -> tuple[str, str, object]:
    """The project and its target, even from a config that no longer
    validates (stopping a stack must not depend on its shards still being there)."""
    import os

    from builder.config import load_config
    from builder.errors import ConfigError

    config = None
    try:
        config = load_config(config_path)
        project, target = config.project, config.target
    except ConfigError:
        import yaml

        try:
            data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            data = None
            if not os.environ.get("BUILDER_PROJECT"):
                raise ConfigError(f"{config_path}: cannot read the project name; pass -c or set BUILDER_PROJECT") from None
        data = data if isinstance(data, dict) else {}
        project, target = str(data.get("project", "builder")), str(data.get("target", "compose"))
        host = data.get("host") if isinstance(data.get("host"), dict) else {}
        if isinstance(host.get("prefix"), str):  # the host target's files, wherever the config put them
            from types import SimpleNamespace

            prefix = Path(host["prefix"]).expanduser()
            config = SimpleNamespace(host_prefix=str(prefix if prefix.is_absolute() else Path(config_path).resolve().parent / prefix))
    return os.environ.get("BUILDER_PROJECT") or project, flag or target, config


def engine_for(target: Target):
    """The container engine, for the targets that need one (the host target does not)."""
    if not target.needs_engine:
        return None
    from builder.image.engine import DockerEngine

    return DockerEngine()
