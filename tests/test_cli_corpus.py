"""The CLI corpus (tests/corpus/cli/cases.yaml): bad shard sets, lock files,
offline fetches and arguments, each with its exit status and one error line,
and the user's files left as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from builder.sample import write_split_model
from tests.fixtures.gguf_edit import edit_metadata
from tests.helpers import run_builder, tree_snapshot

CASES = yaml.safe_load((Path(__file__).parent / "corpus" / "cli" / "cases.yaml").read_text(encoding="utf-8"))


def set_up(root: Path, setup: dict) -> None:
    if setup.get("config"):
        assert run_builder("init", "--preset", setup["config"], cwd=root).returncode == 0
    if setup.get("shards"):
        write_split_model(root / "models" / "tiny", "tiny", 3)
    folder = root / "models" / "tiny"
    damage = setup.get("damage") or {}
    if "remove" in damage:
        (folder / damage["remove"]).unlink()
    if "copy" in damage:
        source, target = damage["copy"]
        (folder / target).write_bytes((folder / source).read_bytes())
    if "magic" in damage:
        path = folder / damage["magic"]
        path.write_bytes(b"GGUX" + path.read_bytes()[4:])
    if "truncate" in damage:
        name, size = damage["truncate"]
        path = folder / name
        path.write_bytes(path.read_bytes()[:size])
    if "edit" in damage:  # whole, well-formed shards that describe a model ollama cannot load
        edit = damage["edit"]
        edit_metadata(folder / edit["file"], tuple(edit.get("drop", ())), edit.get("values"))
    for name, text in (setup.get("files") or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    if "lock" in setup:
        (root / "builder.lock").write_text(setup["lock"])


def test_corpus_size() -> None:
    config_cases = list((Path(__file__).parent / "corpus" / "config").glob("*.yaml"))
    assert len(CASES) + len(config_cases) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cli_case(case: dict, tmp_path: Path) -> None:
    set_up(tmp_path, case["setup"])
    before = tree_snapshot(tmp_path)
    env = {"BUILDER_CACHE_DIR": str(tmp_path / "cache"), **(case["setup"].get("env") or {})}
    result = run_builder(*case["argv"], cwd=tmp_path, env=env)
    assert result.returncode == case["exit"], result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: " + case["error"].format(root=tmp_path)
    assert "Traceback" not in result.stderr
    after = tree_snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "no file the user had may change"
    assert all(k.startswith("cache/") for k in after if k not in before), sorted(set(after) - set(before))
