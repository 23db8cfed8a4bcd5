"""`builder sample-model` writes a model real llama.cpp loads and generates
from (llama-simple, compiled from llama.cpp's source by the fixture): the
demo must answer, not only merge."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from builder.sample import EOS_ID, write_split_model
from builder.supervisor.gguf import read_header_file
from builder.supervisor.loadable import check_loadable
from tests.fixtures.llama_cpp_release import llama_cpp_bin_dir
from tests.helpers import run_builder

PROMPT = "Why is the sky blue?"


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    return llama_cpp_bin_dir()


def llama(bin_dir: Path, tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
    return subprocess.run([str(bin_dir / tool), *args], capture_output=True, text=True, env=env, timeout=120)


def greedy(bin_dir: Path, model: Path, prompt: str, tokens: int) -> tuple[str, str]:
    """llama-simple's greedy continuation of `prompt` (its stdout without the
    echoed prompt) and its log."""
    echo = llama(bin_dir, "llama-simple", "-m", str(model), "-n", "0", prompt)
    run = llama(bin_dir, "llama-simple", "-m", str(model), "-n", str(tokens), prompt)
    assert run.returncode == 0 and echo.returncode == 0, run.stderr[-2000:]
    # llama-simple prints the prompt's pieces, the new pieces, then a newline.
    prompt_echo, out = echo.stdout.removesuffix("\n"), run.stdout.removesuffix("\n")
    assert out.startswith(prompt_echo), (prompt_echo, out)
    return out[len(prompt_echo):], run.stderr


def merge(bin_dir: Path, folder: Path) -> Path:
    merged = folder / "tiny.gguf"
    result = llama(bin_dir, "llama-gguf-split", "--merge", str(folder / "tiny-00001-of-00003.gguf"), str(merged))
    assert result.returncode == 0, result.stdout + result.stderr
    return merged


def test_the_sample_model_generates_eight_tokens_and_the_same_text_twice(tmp_path: Path, llama_bin: Path) -> None:
    texts = []
    for attempt in ("a", "b"):
        root = tmp_path / attempt
        assert run_builder("init", "--preset", "tiny", cwd=root if root.mkdir() is None else root).returncode == 0
        result = run_builder("sample-model", cwd=root)
        assert result.returncode == 0, result.stderr
        folder = root / "models" / "tiny"
        size = sum(p.stat().st_size for p in folder.glob("tiny-*.gguf"))
        assert size < 1_000_000
        text, log = greedy(llama_bin, merge(llama_bin, folder), PROMPT, 8)
        # llama_perf: the prompt's tokens, then 7 decode runs after the first sampled token.
        assert "eval time =" in log and "/     7 runs" in log, log[-1500:]
        assert len(text) == 8 and text.strip(), repr(text)  # one byte a token, letters and spaces
        assert set(text) <= set("abcdefghijklmnopqrstuvwxyz "), repr(text)
        texts.append(text)
    assert texts[0] == texts[1]
    assert (tmp_path / "a" / "models" / "tiny" / "tiny-00001-of-00003.gguf").read_bytes() == (
        tmp_path / "b" / "models" / "tiny" / "tiny-00001-of-00003.gguf"
    ).read_bytes()


def test_llama_cpp_loads_the_shards_directly_and_the_preflight_accepts_them(tmp_path: Path, llama_bin: Path) -> None:
    shards = write_split_model(tmp_path, "tiny", 3)
    headers = [(str(p), read_header_file(str(p))) for p in shards]
    assert check_loadable(headers) == "llama"
    meta = headers[0][1].metadata
    assert len(meta["tokenizer.ggml.tokens"]) == 259 and meta["tokenizer.ggml.eos_token_id"] == EOS_ID
    from_shards, _ = greedy(llama_bin, shards[0], PROMPT, 8)
    from_merged, _ = greedy(llama_bin, merge(llama_bin, tmp_path), PROMPT, 8)
    assert from_shards == from_merged and len(from_shards) == 8


def test_a_model_without_tokens_is_one_llama_cpp_refuses(tmp_path: Path, llama_bin: Path) -> None:
    """What the preflight guards against is real: llama.cpp cannot load it."""
    from tests.fixtures.gguf_edit import edit_metadata

    shards = write_split_model(tmp_path, "tiny", 3)
    edit_metadata(shards[0], drop=("tokenizer.ggml.tokens",))
    result = llama(llama_bin, "llama-simple", "-m", str(shards[0]), "-n", "8", PROMPT)
    assert result.returncode != 0
    assert "tokenizer.ggml.tokens" in result.stderr or "failed to load model" in result.stderr
