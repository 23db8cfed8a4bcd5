"""Plan -> build context: the files as bytes, then one place that writes them.

`render_context` is pure and byte-stable (same plan, same bytes; no clock).
`write_context` is the only function here that touches the disk.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from builder import __version__
from builder.fsutil import write_atomic
from builder.escape import compose_block, compose_scalar, dockerfile_quote
from builder.plan import CONFIG_DIR, COPIES, OLLAMA_PORT, ROOTFS, SUPERVISOR_HOME, Plan
from builder.templates import template_dirs


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dirs()),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters.update(
        dockerfile_quote=dockerfile_quote,
        compose_scalar=compose_scalar,
        compose_block=compose_block,
    )
    return env


def supervisor_files() -> dict[str, bytes]:
    """The supervisor package's sources, as they go into the image."""
    package = resources.files("builder.supervisor")
    return {
        f"{ROOTFS}{SUPERVISOR_HOME}/supervisor/{entry.name}": entry.read_bytes()
        for entry in sorted(package.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".py")
    }


def render_context(plan: Plan) -> dict[str, bytes]:
    """Every file of the build context, keyed by its path in the context."""
    env = _environment()
    dockerfile = env.get_template("dockerfiles/Dockerfile.j2").render(
        builder_version=__version__,
        base_image=plan.base.image,
        ollama_version=plan.config.ollama.version,
        llama_cpp_build=plan.config.llama_cpp.version,
        copies=COPIES,
        image_env=plan.image_env,
        port=OLLAMA_PORT,
        labels=plan.labels,
    )
    compose = env.get_template("compose/compose.yaml.j2").render(builder_version=__version__, **plan.compose)
    runtime = json.dumps(plan.runtime, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    files = {
        "Dockerfile": dockerfile.encode(),
        "compose.yaml": compose.encode(),
        f"{ROOTFS}{CONFIG_DIR}/Modelfile": plan.modelfile.encode(),
        f"{ROOTFS}{CONFIG_DIR}/runtime.json": runtime.encode(),
        ".dockerignore": ("# Only what the Dockerfile copies.\n*\n" + "".join(f"!{src}/\n" for src, _ in COPIES)).encode(),
    }
    files.update(supervisor_files())
    return dict(sorted(files.items()))


def write_context(files: dict[str, bytes], out_dir: Path, mtime: int) -> Path:
    """Write `files` under `out_dir`, each atomically, with a fixed mtime.

    Files already there that this render does not produce (the staged release
    trees) are left alone; nothing is half-written if the run is cut.
    """
    for name, data in files.items():
        write_atomic(out_dir / name, data, mtime=mtime)
    # Every folder a COPY reads, up to the context itself, gets the fixed mtime.
    for name in files:
        for parent in (out_dir / name).relative_to(out_dir).parents:
            os.utime(out_dir / parent, (mtime, mtime))
    return out_dir
