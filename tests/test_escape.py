"""Values reach each file escaped for its language, or are refused."""

from __future__ import annotations

import json

import pytest
import yaml

from builder.config import parse_config
from builder.render.escape import Unrepresentable, compose_block, compose_scalar, dockerfile_quote
from builder.modelfile import check_modelfile_text, check_stop, render_modelfile
from builder.render.blueprint import make_blueprint
from builder.render.files import render_context
from tests.doubles.modelfile_parser import parse_modelfile
from tests.test_render_golden import CONFIG_DIR

NASTY = ['plain', 'say "hi"', "$HOME and ${PATH}", "`rm -rf /`", "{{ .Prompt }}", "back\\slash", "tab\there", "<｜User｜>"]


@pytest.mark.parametrize("value", NASTY)
def test_compose_values_survive_yaml_and_interpolation(value: str) -> None:
    scalar = yaml.safe_load(compose_scalar(value))
    assert scalar.replace("$$", "$") == value
    block = yaml.safe_load(compose_block({"KEY": value}, 2))
    assert block["KEY"].replace("$$", "$") == value


def test_dockerfile_quote() -> None:
    assert dockerfile_quote('a "b" $c \\d') == '"a \\"b\\" \\$c \\\\d"'
    with pytest.raises(Unrepresentable):
        dockerfile_quote("two\nlines")


@pytest.mark.parametrize("template", NASTY + ["line one\nline two", '"quoted at both ends"', 'ends with "', "  padded  "])
def test_modelfile_text_round_trips_through_ollamas_parser(template: str) -> None:
    assert check_modelfile_text(template) is None
    text = render_modelfile("/models/m.gguf", [("stop", ("<|end|>", 'a "b"')), ("temperature", 0.6)], template, template, "header")
    commands = parse_modelfile(text)
    assert ("from", "/models/m.gguf") in commands
    assert ("template", template) in commands and ("system", template) in commands
    assert ("parameter", "stop <|end|>") in commands and ('parameter', 'stop a "b"') in commands
    assert ("parameter", "temperature 0.6") in commands


@pytest.mark.parametrize("bad", ['has """ inside', "bell\x07", 'ends """'])
def test_unrepresentable_templates_are_refused(bad: str) -> None:
    assert check_modelfile_text(bad)


@pytest.mark.parametrize("bad", ["a\nb", '""x', "nul\x00"])
def test_unrepresentable_stops_are_refused(bad: str) -> None:
    assert check_stop(bad)


def test_nasty_env_values_render_into_compose() -> None:
    text = (
        "version: 1\nmodel:\n  name: m\n  shards: m-00001-of-00002.gguf\nstorage:\n  local: /srv/m\n"
        "serve:\n  env:\n"
        + "".join(f"    V{i}: {yaml.safe_dump(v, default_style=chr(34)).strip()}\n" for i, v in enumerate(NASTY))
    )
    config = parse_config(text, "builder.yaml", base_dir=CONFIG_DIR, env={})
    compose = yaml.safe_load(render_context(make_blueprint(config))["compose.yaml"])
    env = compose["services"]["serve"]["environment"]
    assert json.loads(env.pop("BUILDER_SERVE")) == config.serve.limits()  # builder's own, beside the user's
    assert {k: v.replace("$$", "$") for k, v in env.items()} == {f"V{i}": v for i, v in enumerate(NASTY)}


def test_nasty_values_survive_kubernetes_and_the_docker_run_line() -> None:
    import shlex

    from builder.targets import context_files
    from builder.targets.single import single_argv

    text = (
        "version: 1\nmodel:\n  name: m\n  shards: m-00001-of-00002.gguf\nstorage:\n  local: /srv/m\ngpus: 1\n"
        "serve:\n  env:\n"
        + "".join(f"    V{i}: {yaml.safe_dump(v, default_style=chr(34)).strip()}\n" for i, v in enumerate(NASTY))
    )
    config = parse_config(text, "builder.yaml", base_dir=CONFIG_DIR, env={})
    blueprint = make_blueprint(config)
    files = context_files(blueprint, "kubernetes")
    deployment = yaml.safe_load(files["kubernetes/deployment.yaml"])
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env.pop("BUILDER_SERVE")) == config.serve.limits()
    assert json.loads(env.pop("BUILDER_GATE"))["keys"] == "/run/builder-keys/api-keys"  # Kubernetes always asks for keys
    assert env == {f"V{i}": v for i, v in enumerate(NASTY)}
    run_sh = context_files(blueprint, "single")["single/run.sh"].decode()
    command = run_sh.split("\n", 6)[-1].replace("\\\n", " ")
    assert shlex.split(command) == single_argv(blueprint)
    assert [a.split("=", 1)[1] for a in single_argv(blueprint) if a.startswith("V") and "=" in a] == NASTY
