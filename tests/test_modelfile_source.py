"""One source for the create request: the rendered Modelfile, read by
ollama's own Modelfile parser (the double's port of parser/parser.go) and
turned into a request the way ollama's client does, equals the request the
supervisor POSTs (runtime.json's `create`)."""

from __future__ import annotations

import json

import pytest

from builder.cli import PRESETS_DIR, preset_names
from builder.config import parse_config
from builder.render.blueprint import make_blueprint
from builder.targets import context_files
from tests.test_ollama_double import load_double
from tests.test_render_golden import CONFIG_DIR

od = load_double()


def _as_ollama(value):
    """A parameter as the server holds it: floats as float32, lists as lists."""
    if isinstance(value, list):
        return [_as_ollama(v) for v in value]
    if isinstance(value, float) and not isinstance(value, bool):
        return od._to_f32(value)
    return value


@pytest.mark.parametrize("preset", preset_names())
def test_the_modelfile_and_the_create_request_say_the_same(preset: str) -> None:
    config = parse_config((PRESETS_DIR / f"{preset}.yaml").read_text(encoding="utf-8"), "builder.yaml", base_dir=CONFIG_DIR, env={})
    files = context_files(make_blueprint(config), "compose")
    modelfile = files["rootfs/etc/builder/Modelfile"].decode()
    runtime = json.loads(files["rootfs/etc/builder/runtime.json"])
    commands = od.parse_modelfile(modelfile)
    assert commands[0] == ("model", runtime["merged"])  # FROM names the merged file the request's blob comes from
    request = od.create_request(commands[1:], "/")
    sent = runtime["create"]
    assert set(request) - {"license", "messages"} == set(sent)
    assert request.get("template") == sent.get("template") and request.get("system") == sent.get("system")
    assert {k: _as_ollama(v) for k, v in request["parameters"].items()} == {k: _as_ollama(v) for k, v in sent["parameters"].items()}
