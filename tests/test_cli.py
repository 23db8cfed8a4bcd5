"""The command line as a user meets it: help, version, init, schema, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from builder.cli import main, preset_names
from tests.helpers import run_builder, tree_snapshot


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from builder.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('docker', 'httpx', 'jinja2', 'jsonschema', 'gguf', 'numpy') if m in sys.modules)\n"
        "print('heavy:' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "heavy:"


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help(command: str) -> None:
    result = run_builder(command, "--help")
    assert result.returncode == 0
    assert "Usage: " in result.stdout


def test_version() -> None:
    from builder import __version__

    result = run_builder("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = run_builder("deploy")
    assert result.returncode == 2
    assert "No such command 'deploy'" in result.stderr


@pytest.mark.parametrize("preset", preset_names())
def test_init_writes_a_valid_config(preset: str, tmp_path: Path) -> None:
    result = run_builder("init", "--preset", preset, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "builder.yaml").read_text(encoding="utf-8")
    assert text.startswith("# builder.yaml")
    render = run_builder("render", cwd=tmp_path)
    assert render.returncode == 0, render.stderr
    assert (tmp_path / "context" / "Dockerfile").is_file()


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "builder.yaml").write_text("mine\n")
    result = run_builder("init", "--preset", "tiny", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: builder.yaml exists; pass --force to overwrite it or -o to write elsewhere"
    assert (tmp_path / "builder.yaml").read_text() == "mine\n"
    forced = run_builder("init", "--preset", "tiny", "--force", cwd=tmp_path)
    assert forced.returncode == 0
    assert (tmp_path / "builder.yaml").read_text() != "mine\n"


def test_init_unknown_preset(tmp_path: Path) -> None:
    result = run_builder("init", "--preset", "deepseek", cwd=tmp_path)
    assert result.returncode == 2
    assert "'deepseek' is not one of" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_builder("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: builder.yaml: no such file; create one with `builder init --preset tiny -o builder.yaml`"
    )


def test_schema_is_json_schema_and_accepts_presets(tmp_path: Path) -> None:
    import yaml
    from jsonschema import Draft202012Validator

    result = run_builder("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    Draft202012Validator.check_schema(schema)
    from builder.cli import PRESETS_DIR

    for preset in preset_names():
        data = yaml.safe_load((PRESETS_DIR / f"{preset}.yaml").read_text(encoding="utf-8"))
        assert list(Draft202012Validator(schema).iter_errors(data)) == [], preset


def test_validate_reports_missing_shards_then_passes(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    result = run_builder("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert "3 of 3 shard(s) missing in" in result.stderr and "tiny-00001-of-00003.gguf" in result.stderr
    from builder.sample import write_split_model

    write_split_model(tmp_path / "models" / "tiny", "tiny", 3)
    result = run_builder("validate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok (tiny:latest, local storage, image builder-tiny:demo)" in result.stdout


def test_shard_folder_is_resolved_on_local_storage(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "M"
    folder.mkdir(parents=True)
    for n in (1, 2):
        (folder / f"M-{n:05d}-of-00002.gguf").write_bytes(b"GGUF")
    text = (
        "version: 1\nmodel:\n  name: m\n  shards: M/\nstorage:\n  local: models\ngpus: none\n"
    )
    (tmp_path / "builder.yaml").write_text(text)
    result = run_builder("render", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    modelfile = (tmp_path / "context" / "rootfs" / "etc" / "builder" / "Modelfile").read_text()
    assert "FROM /models/M/M.gguf\n" in modelfile


def test_env_override_error_names_the_variable(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    result = run_builder("render", cwd=tmp_path, env={"BUILDER_SERVE_PORT": "99999"})
    assert result.returncode == 2
    assert result.stderr.strip() == "error: $BUILDER_SERVE_PORT: serve.port: must be between 1 and 65535, got 99999"


def test_public_bind_warns(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    result = run_builder("render", cwd=tmp_path, env={"BUILDER_SERVE_BIND": "0.0.0.0"})
    assert result.returncode == 0
    assert "serve.bind is 0.0.0.0: every request needs an API key (serve.auth: keys" in result.stderr
    compose = (tmp_path / "context" / "compose.yaml").read_text()
    assert "BUILDER_GATE:" in compose and f"file: \"{tmp_path}/api-keys\"" in compose


def test_render_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "deepseek-r1-ud-q2_k_xl", cwd=tmp_path).returncode == 0
    assert run_builder("render", cwd=tmp_path).returncode == 0
    first = tree_snapshot(tmp_path / "context")
    assert run_builder("render", cwd=tmp_path).returncode == 0
    assert tree_snapshot(tmp_path / "context") == first


def test_sample_model_writes_the_shards_the_config_names(tmp_path: Path) -> None:
    import gguf

    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    result = run_builder("sample-model", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shards = sorted((tmp_path / "models" / "tiny").iterdir())
    assert [p.name for p in shards] == [f"tiny-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    assert gguf.GGUFReader(shards[0]).fields["split.count"].parts[-1][0] == 3
    assert run_builder("validate", cwd=tmp_path).returncode == 0
    again = run_builder("sample-model", cwd=tmp_path)
    assert again.returncode == 2 and "pass --force" in again.stderr
    assert run_builder("sample-model", "--force", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "models" / "tiny").iterdir()) == [p.name for p in shards]


def test_sample_model_never_overwrites_a_merged_file(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    merged = tmp_path / "models" / "tiny" / "tiny.gguf"
    merged.parent.mkdir(parents=True)
    merged.write_bytes(b"the user's model")
    result = run_builder("sample-model", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {merged} exists; pass --force to overwrite the sample's files"
    assert merged.read_bytes() == b"the user's model"


def test_sample_model_with_too_many_shards(tmp_path: Path) -> None:
    (tmp_path / "builder.yaml").write_text("version: 1\nmodel:\n  name: m\n  shards: m/m-00001-of-00022.gguf\nstorage:\n  local: models\n")
    result = run_builder("sample-model", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model.shards: a sample model of 2 blocks can be split in 1 to 21 shards, not 22"
    assert [p.name for p in (tmp_path / "models" / "m").iterdir()] == []


def test_sample_model_refuses_nfs(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "deepseek-r1-ud-iq1_s", cwd=tmp_path).returncode == 0
    result = run_builder("sample-model", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: sample-model writes to local storage only; this config uses NFS"


def test_render_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "Dockerfile").write_text("FROM scratch\n")
    result = run_builder("render", "--out", str(mine), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {mine} holds files builder did not write; render into an empty or new folder (--out)"
    assert (mine / "Dockerfile").read_text() == "FROM scratch\n"


def test_render_prunes_stale_image_files(tmp_path: Path) -> None:
    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    assert run_builder("render", cwd=tmp_path).returncode == 0
    stale = tmp_path / "context" / "rootfs" / "opt" / "builder" / "supervisor" / "old_module.py"
    stale.write_text("print('I would reach the image')\n")
    keep = tmp_path / "context" / "staged" / "ollama" / "bin" / "ollama"
    keep.parent.mkdir(parents=True)
    keep.write_text("staged by build\n")
    assert run_builder("render", cwd=tmp_path).returncode == 0
    assert not stale.exists() and keep.read_text() == "staged by build\n"


def _tiny_with_shards(tmp_path: Path) -> Path:
    from builder.sample import write_split_model

    assert run_builder("init", "--preset", "tiny", cwd=tmp_path).returncode == 0
    write_split_model(tmp_path / "models" / "tiny", "tiny", 3)
    return tmp_path / "models" / "tiny"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncated", "error: builder.yaml: model.shards: shard {folder}/tiny-00002-of-00003.gguf is truncated"),
        ("bad-magic", "error: builder.yaml: model.shards: shard {folder}/tiny-00002-of-00003.gguf is not a GGUF file (bad magic)"),
        ("duplicate", "error: builder.yaml: model.shards: shard {folder}/tiny-00003-of-00003.gguf says it is part 2 of 3, expected part 3 of 3"),
        ("other-model", "error: builder.yaml: model.shards: the shards in {folder} hold"),
        ("merged-not-gguf", "error: builder.yaml: model.merged: {folder}/tiny.gguf is not a GGUF file (bad magic); delete it and `builder up` merges again"),
    ],
)
def test_validate_checks_the_shard_set_before_anything_runs(tmp_path: Path, damage: str, expected: str) -> None:
    from builder.sample import write_split_model

    folder = _tiny_with_shards(tmp_path)
    second, third = folder / "tiny-00002-of-00003.gguf", folder / "tiny-00003-of-00003.gguf"
    if damage == "truncated":
        second.write_bytes(second.read_bytes()[:-4096])
    elif damage == "bad-magic":
        second.write_bytes(b"GGUX" + second.read_bytes()[4:])
    elif damage == "duplicate":
        third.write_bytes(second.read_bytes())
    elif damage == "other-model":
        other = write_split_model(tmp_path / "other", "tiny", 3, blocks=6)
        second.write_bytes(other[1].read_bytes())
    else:
        (folder / "tiny.gguf").write_bytes(b"not a model")
    before = tree_snapshot(folder)
    result = run_builder("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.strip().startswith(expected.format(folder=folder)), result.stderr
    assert tree_snapshot(folder) == before
