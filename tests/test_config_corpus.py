"""Bad configs: each file in corpus/config names its exit status and its one
error line; the check also proves the file was left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import run_builder, tree_snapshot

CORPUS = Path(__file__).parent / "corpus" / "config"
CASES = sorted(CORPUS.glob("*.yaml"))


def _expectation(path: Path) -> tuple[int, str]:
    first, second = path.read_text(encoding="utf-8").split("\n")[:2]
    assert first.startswith("# expect-exit: ") and second.startswith("# expect: "), path
    return int(first.split(": ", 1)[1]), second.split(": ", 1)[1]


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_config(case: Path, tmp_path: Path) -> None:
    exit_code, message = _expectation(case)
    shutil.copy(case, tmp_path / case.name)
    before = tree_snapshot(tmp_path)
    for command in ("validate", "render"):
        result = run_builder(command, "-c", case.name, cwd=tmp_path)
        assert result.returncode == exit_code, result.stderr
        assert result.stderr.splitlines() == [f"error: {message}"]
        assert "Traceback" not in result.stderr
        assert tree_snapshot(tmp_path) == before, "a bad config must leave the user's files as they were"
