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
from builder.errors import ConfigError
from builder.render.escape import compose_block, compose_scalar, dockerfile_quote, sh, sh_join
from builder.render.blueprint import CONFIG_DIR, COPIES, OLLAMA_PORT, ROOTFS, SUPERVISOR_HOME, Blueprint
from builder.render.templates import template_dirs


MARKER = ".builder-context"


def environment():
    """The Jinja2 environment every template renders in (StrictUndefined, the escaping filters)."""
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
        sh=sh,
        sh_join=sh_join,
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


def render_context(blueprint: Blueprint) -> dict[str, bytes]:
    """The image's files and compose.yaml, keyed by their path in the context
    (every target's context has them; targets.context_files adds the target's own)."""
    env = environment()
    dockerfile = env.get_template("dockerfiles/Dockerfile.j2").render(
        builder_version=__version__,
        base_image=blueprint.base.image,
        ollama_version=blueprint.config.ollama.version,
        llama_cpp_build=blueprint.config.llama_cpp.version,
        copies=COPIES,
        image_env=blueprint.image_env,
        user=blueprint.user,
        port=OLLAMA_PORT,
        labels=blueprint.labels,
    )
    compose = env.get_template("compose/compose.yaml.j2").render(builder_version=__version__, **blueprint.compose)
    runtime = json.dumps(blueprint.runtime, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    files = {
        MARKER: b"This folder is a build context written by builder; `builder render` rewrites it.\n",
        "Dockerfile": dockerfile.encode(),
        "compose.yaml": compose.encode(),
        f"{ROOTFS}{CONFIG_DIR}/Modelfile": blueprint.modelfile.encode(),
        f"{ROOTFS}{CONFIG_DIR}/runtime.json": runtime.encode(),
        ".dockerignore": ("# Only what the Dockerfile copies.\n*\n" + "".join(f"!{src}/\n" for src, _ in COPIES)).encode(),
    }
    files.update(supervisor_files())
    return dict(sorted(files.items()))


def write_context(files: dict[str, bytes], out_dir: Path, mtime: int) -> Path:
    """Write `files` under `out_dir`, each atomically, with a fixed mtime.

    The staged release trees are left alone; a file under rootfs/ that this
    render no longer produces is removed (it would reach the image). A folder
    that holds files but no marker was not written by builder: refused.
    """
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ConfigError(f"{out_dir} holds files builder did not write; render into an empty or new folder (--out)")
    for name, data in files.items():
        write_atomic(out_dir / name, data, mtime=mtime)
    rootfs = out_dir / ROOTFS
    for path in sorted(rootfs.rglob("*"), reverse=True) if rootfs.is_dir() else ():
        rel = str(path.relative_to(out_dir))
        if path.is_file() and rel not in files:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    # Every folder a COPY reads, up to the context itself: fixed mode and mtime,
    # whatever the umask.
    for name in files:
        for parent in (out_dir / name).relative_to(out_dir).parents:
            os.chmod(out_dir / parent, 0o755)
            os.utime(out_dir / parent, (mtime, mtime))
    return out_dir
