"""ollama generations: which versions are supported, the release URL each
gets by default, and what the rendered files say for each (0.5.x unchanged:
its golden files are in tests/golden)."""

from __future__ import annotations

import json

import pytest

from builder.cli import PRESETS_DIR
from builder.config import parse_config
from builder.config.releases import default_url, generation
from builder.render.blueprint import make_blueprint
from builder.targets import context_files
from tests.test_ollama_double import load_double
from tests.test_render_golden import CONFIG_DIR


@pytest.mark.parametrize(("version", "expected"), [
    ("0.5.0", "0.5"), ("0.5.7", "0.5"), ("0.5.13-rc1", "0.5"),
    ("0.30.0", "0.30"), ("0.32.15", "0.30"), ("0.33.0-rc2", "0.30"), ("1.0.0", "0.30"),
    ("0.4.7", None), ("0.6.0", None), ("0.14.0", None), ("0.24.0", None), ("0.29.9", None), ("0.5", None),
    ("0.30.0-rc0", None), ("0.30.0-rc15", None), ("0.30.0-rc16", "0.30"), ("0.31.0-rc1", "0.30"),
])
def test_generation_of_each_version(version: str, expected: str | None) -> None:
    assert generation(version) == expected


def test_default_urls_follow_the_release_format() -> None:
    base = "https://github.com/ollama/ollama/releases/download"
    assert default_url("0.5.7") == f"{base}/v0.5.7/ollama-linux-amd64.tgz"
    assert default_url("0.32.15") == f"{base}/v0.32.15/ollama-linux-amd64.tar.zst"


def _render(version: str | None) -> dict[str, bytes]:
    text = (PRESETS_DIR / "tiny.yaml").read_text(encoding="utf-8")
    if version:
        text += f"ollama:\n  version: {version}\n"
    config = parse_config(text, "builder.yaml", base_dir=CONFIG_DIR, env={})
    return context_files(make_blueprint(config), "compose"), config


def test_a_current_ollama_renders_its_generation_and_a_shard_folder_modelfile() -> None:
    files, config = _render("0.32.15")
    assert config.ollama.url.endswith("/v0.32.15/ollama-linux-amd64.tar.zst")
    runtime = json.loads(files["rootfs/etc/builder/runtime.json"])
    assert runtime["ollama_generation"] == "0.30"
    od = load_double()
    commands = od.parse_modelfile(files["rootfs/etc/builder/Modelfile"].decode())
    # By hand, `ollama create` of 0.30+ takes the folder of shards (a lone first shard is refused).
    assert commands[0] == ("model", "/models/tiny")
    assert {k for k, _ in commands[1:]} >= {"template", "num_ctx", "temperature"}


def test_the_default_generation_renders_as_before() -> None:
    files, config = _render(None)
    assert config.ollama.url.endswith("/v0.5.7/ollama-linux-amd64.tgz")
    runtime = json.loads(files["rootfs/etc/builder/runtime.json"])
    assert "ollama_generation" not in runtime
    assert files == _render("0.5.7")[0]


@pytest.mark.parametrize(("version", "num_ctx", "gib", "expected"), [
    ("0.5.7", None, [24, 24], 2048),  # ollama 0.5.7's default
    ("0.32.15", None, [16], 4096),  # v0.32.15 server/routes.go: by total GPU memory
    ("0.32.15", None, [24], 32768),
    ("0.32.15", None, [24, 24], 262144),
    ("0.32.15", 8192, [24, 24], 8192),  # the config's own wins
])
def test_the_planned_context_is_the_one_ollama_will_use(version, num_ctx, gib, expected) -> None:
    from builder.preflight.sizing import default_num_ctx

    text = (PRESETS_DIR / "tiny.yaml").read_text(encoding="utf-8").replace("    num_ctx: 512\n", f"    num_ctx: {num_ctx}\n" if num_ctx else "")
    config = parse_config(text + f"ollama:\n  version: {version}\n", "builder.yaml", base_dir=CONFIG_DIR, env={})
    assert default_num_ctx(config, [g << 30 for g in gib]) == expected
