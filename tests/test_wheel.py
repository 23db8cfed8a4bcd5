"""`pip install .` into a fresh venv, then `builder render` from any folder:
the templates and presets must ship inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

from tests.conftest import REPO
from tests.helpers import registry_client_env


def test_wheel_renders_from_anywhere(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        env=registry_client_env(),  # the build backend comes from PyPI
    )
    wheel = next(wheels.glob("*.whl"))
    env_dir = tmp_path / "venv"
    # System site-packages give the dependencies without a download; the
    # venv's own copy of builder (from the wheel) comes first on sys.path.
    venv.EnvBuilder(with_pip=False, system_site_packages=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import builder; print(builder.__file__)"], cwd=work, capture_output=True, text=True, check=True
    )
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout
    builder = env_dir / "bin" / "builder"
    for argv in ([str(builder), "init", "--preset", "deepseek-r1-ud-iq1_m"], [str(builder), "render"]):
        result = subprocess.run(argv, cwd=work, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    golden = REPO / "tests" / "golden" / "deepseek-r1-ud-iq1_m"
    for name in ("Dockerfile", "compose.yaml", "rootfs/etc/builder/Modelfile"):
        assert (work / "context" / name).read_bytes() == (golden / name).read_bytes()
    assert (work / "context" / "rootfs" / "opt" / "builder" / "supervisor" / "__main__.py").is_file()
