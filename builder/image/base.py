"""A base image without a registry: mmdebstrap a minimal root from a Debian
or Ubuntu mirror, then load it with a config we write ourselves.

`docker import` stamps the current time, so two imports of the same tar give
two image IDs. A `docker load` archive whose config bytes are fixed gives the
same ID every time (the ID is the sha256 of those bytes), and mmdebstrap with
SOURCE_DATE_EPOCH writes the same tar every time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from datetime import datetime, timezone
from pathlib import Path

from builder.fsutil import sha256_file
from builder.render.blueprint import IMAGE_PATH, BasePlan


def mmdebstrap_argv(base: BasePlan, out_tar: Path) -> list[str]:
    """The mmdebstrap command that writes the root file system as a tar."""
    assert base.bootstrap and base.suite and base.mirror
    argv = ["mmdebstrap", "--variant=minbase", f"--include={','.join(base.packages)}"]
    if base.distro == "ubuntu":
        argv.append("--components=main,universe")
    # Leave out what a server image never reads; smaller, and still a valid root.
    argv += ["--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*"]
    argv += [base.suite, str(out_tar), base.mirror]
    return argv


def image_config(layer_sha256: str, epoch: int, created_by: str) -> bytes:
    """The image config JSON, byte-stable for the same layer and epoch."""
    created = datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {
        "architecture": "amd64",
        "config": {"Cmd": ["/bin/sh"], "Env": [f"PATH={IMAGE_PATH}"]},
        "created": created,
        "history": [{"created": created, "created_by": created_by}],
        "os": "linux",
        "rootfs": {"diff_ids": [f"sha256:{layer_sha256}"], "type": "layers"},
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def write_load_archive(layer_tar: Path, image: str, epoch: int, created_by: str, out: Path) -> str:
    """Write a `docker load` archive for one layer; return the image ID it will get."""
    layer_sha = sha256_file(layer_tar)
    config = image_config(layer_sha, epoch, created_by)
    config_sha = hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        [{"Config": f"{config_sha}.json", "Layers": [f"{layer_sha}/layer.tar"], "RepoTags": [image]}],
        separators=(",", ":"),
    ).encode()

    def member(name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, epoch, 0o644
        return info

    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.addfile(member("manifest.json", len(manifest)), io.BytesIO(manifest))
        archive.addfile(member(f"{config_sha}.json", len(config)), io.BytesIO(config))
        with layer_tar.open("rb") as handle:
            archive.addfile(member(f"{layer_sha}/layer.tar", os.path.getsize(layer_tar)), handle)
    return f"sha256:{config_sha}"


def ensure_base(base: BasePlan, epoch: int, engine, echo, work_dir: Path) -> str:
    """Make sure the engine has the base image; return its ID.

    A bootstrap base is built once per set of inputs (its name carries their
    hash); a registry base is pulled.
    """
    import subprocess
    import sys
    import tempfile

    from builder.errors import BuilderError

    found = engine.image_id(base.image)
    if found:
        return found
    if not base.bootstrap:
        echo(f"pulling {base.image}")
        return engine.pull(base.image, echo)
    import shutil

    if shutil.which("mmdebstrap") is None:
        raise BuilderError("mmdebstrap is not installed (needed to bootstrap the base image); apt-get install mmdebstrap, or set image.base.ref")
    echo(f"bootstrapping {base.image} from {base.mirror} ({base.distro} {base.suite}); this takes about a minute")
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="base-") as tmp:
        layer = Path(tmp) / "rootfs.tar"
        argv = mmdebstrap_argv(base, layer)
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch))
        interactive = sys.stderr.isatty()
        result = subprocess.run(argv, env=env, stdout=None if interactive else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stdout or "").strip().splitlines()[-5:])
            raise BuilderError(
                f"mmdebstrap failed for {base.mirror} ({base.suite}); check mirrors.{base.distro} is reachable: {tail}"
            )
        archive = Path(tmp) / "image.tar"
        expected = write_load_archive(layer, base.image, epoch, " ".join(argv[:-2] + [base.suite, base.mirror]), archive)
        engine.load(archive)
    loaded = engine.image_id(base.image)
    if loaded != expected:
        raise BuilderError(f"loaded {base.image} as {loaded}, expected {expected}")
    echo(f"base image {base.image} is {loaded}")
    return loaded
