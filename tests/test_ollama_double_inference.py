"""The ollama double answers with real inference: its runner is llama.cpp's
llama-server (compiled from source by the fixture), started the way ollama
0.5.7 starts `ollama_llama_server`, so every answer here is compared with
llama.cpp's own greedy run (llama-simple) on the same blob and the prompt
ollama's template rules give."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from builder.sample import write_split_model
from tests.fixtures.gguf_edit import edit_metadata
from tests.fixtures.llama_cpp_release import llama_cpp_bin_dir
from tests.fixtures.ollama_release import unpack_ollama_release
from tests.test_ollama_double import Server
from tests.test_sample_model import greedy, llama, merge

PROMPT = "Why is the sky blue?"
MODELFILE = """FROM ./tiny.gguf
PARAMETER temperature 0
PARAMETER repeat_penalty 1
PARAMETER num_predict 8
TEMPLATE \"\"\"{{ if .System }}S:{{ .System }} {{ end }}U:{{ .Prompt }} A:{{ .Response }}\"\"\"
"""


class ReleaseServer(Server):
    """`ollama serve` from the release archive unpacked (bin/ollama and lib/ollama/runners/)."""

    def __init__(self, models: Path, ollama: Path, **extra_env: str):
        self.ollama = ollama
        super().__init__(models, **extra_env)

    def command(self) -> list[str]:
        return [str(self.ollama)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    ollama = unpack_ollama_release(root / "release")
    bin_dir = llama_cpp_bin_dir()
    write_split_model(root / "work", "tiny", 3)
    merged = merge(bin_dir, root / "work")
    (root / "work" / "Modelfile").write_text(MODELFILE, encoding="utf-8")
    srv = ReleaseServer(root / "models", ollama)
    created = srv.cli("create", "tiny", "-f", str(root / "work" / "Modelfile"))
    assert created.returncode == 0, created.stderr
    yield srv, bin_dir, merged, root
    srv.stop()


def test_generate_is_llama_cpp_greedy_through_the_modelfile_template(world) -> None:
    srv, bin_dir, merged, _root = world
    expected, _ = greedy(bin_dir, merged, f"U:{PROMPT} A:", 8)
    answer = srv.http.post("/api/generate", json={"model": "tiny", "prompt": PROMPT, "stream": False}, timeout=120).json()
    assert answer["response"] == expected and len(expected) == 8
    assert (answer["done"], answer["done_reason"], answer["eval_count"]) == (True, "length", 8)
    assert answer["prompt_eval_count"] > 0 and answer["total_duration"] >= answer["load_duration"] > 0
    assert isinstance(answer["context"], list) and all(isinstance(t, int) for t in answer["context"])
    with srv.http.stream("POST", "/api/generate", json={"model": "tiny", "prompt": PROMPT}, timeout=120) as streamed:
        assert streamed.headers["content-type"] == "application/x-ndjson"
        chunks = [json.loads(line) for line in streamed.iter_lines() if line]
    assert "".join(c["response"] for c in chunks) == expected
    assert chunks[-1]["done"] is True and chunks[-1]["eval_count"] == 8 and not any(c["done"] for c in chunks[:-1])


def test_request_options_and_system_reach_the_runner(world) -> None:
    srv, bin_dir, merged, _root = world
    expected, _ = greedy(bin_dir, merged, f"S:be brief U:{PROMPT} A:", 5)
    answer = srv.http.post("/api/generate", json={
        "model": "tiny", "prompt": PROMPT, "system": "be brief", "stream": False, "options": {"num_predict": 5},
    }, timeout=120).json()
    assert (answer["response"], answer["eval_count"]) == (expected, 5)
    raw, _ = greedy(bin_dir, merged, PROMPT, 8)
    answer = srv.http.post("/api/generate", json={"model": "tiny", "prompt": PROMPT, "raw": True, "stream": False}, timeout=120).json()
    assert answer["response"] == raw and "context" not in answer
    # stop cuts the answer where the string starts
    stop = expected[2:4]
    cut = srv.http.post("/api/generate", json={
        "model": "tiny", "prompt": PROMPT, "system": "be brief", "stream": False, "options": {"num_predict": 5, "stop": [stop]},
    }, timeout=120).json()
    assert cut["response"] == expected[: expected.index(stop)] and cut["done_reason"] == "stop"
    # temperature > 0: the seed decides, so the same seed gives the same text
    sampled = [
        srv.http.post("/api/generate", json={
            "model": "tiny", "prompt": PROMPT, "stream": False, "options": {"temperature": 1.5, "seed": 42, "num_predict": 12},
        }, timeout=120).json()["response"]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] and len(sampled[0].encode("utf-8", "surrogateescape")) >= 1


def test_chat_applies_the_template_to_the_history_as_ollama_does(world) -> None:
    srv, bin_dir, merged, _root = world
    # Legacy templates (no .Messages): each user/assistant pair is one
    # execution of the template; the last stops at {{ .Response }}.
    expected, _ = greedy(bin_dir, merged, "U:hello A:hiU:why A:", 8)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "why"}]
    answer = srv.http.post("/api/chat", json={"model": "tiny", "messages": messages, "stream": False}, timeout=120).json()
    assert answer["message"] == {"role": "assistant", "content": expected}
    assert answer["eval_count"] == 8 and answer["done_reason"] == "length"
    openai = srv.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 8,
    }, timeout=120).json()
    assert openai["object"] == "chat.completion" and openai["id"].startswith("chatcmpl-")
    assert openai["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert openai["usage"]["completion_tokens"] == 8 and openai["choices"][0]["finish_reason"] == "length"
    completion = srv.http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 8}, timeout=120).json()
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == greedy(bin_dir, merged, f"U:{PROMPT} A:", 8)[0]


def test_ollama_run_prints_the_answer(world) -> None:
    srv, bin_dir, merged, _root = world
    # stdin is not a terminal: ollama prepends what it read (nothing) and a
    # space to the prompt (cmd.go RunHandler), and prints two newlines after.
    expected, _ = greedy(bin_dir, merged, f"U: {PROMPT} A:", 8)
    result = subprocess.run([str(srv.ollama), "run", "tiny", PROMPT], env=srv.env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n\n"


def test_empty_prompt_loads_ps_lists_and_keep_alive_zero_unloads(world) -> None:
    srv, _bin_dir, _merged, _root = world
    srv.http.post("/api/generate", json={"model": "tiny", "keep_alive": 0}, timeout=60)
    deadline = time.monotonic() + 10  # the scheduler expires the runner after answering
    while srv.http.get("/api/ps").json() != {"models": []}:
        assert time.monotonic() < deadline, srv.http.get("/api/ps").json()
        time.sleep(0.1)
    loaded = srv.http.post("/api/generate", json={"model": "tiny", "keep_alive": -1}, timeout=120).json()
    assert (loaded["done"], loaded["done_reason"], loaded["response"]) == (True, "load", "")
    (ps,) = srv.http.get("/api/ps").json()["models"]
    assert ps["name"] == "tiny:latest" and ps["size_vram"] == 0 and int(ps["expires_at"][:4]) >= 2318  # now + 292 years
    chat_load = srv.http.post("/api/chat", json={"model": "tiny", "messages": []}, timeout=60).json()
    assert chat_load["done_reason"] == "load"
    unloaded = srv.http.post("/api/generate", json={"model": "tiny", "keep_alive": 0}, timeout=60).json()
    assert unloaded["done_reason"] == "unload"
    deadline = time.monotonic() + 10
    while srv.http.get("/api/ps").json() != {"models": []}:
        assert time.monotonic() < deadline, srv.http.get("/api/ps").json()
        time.sleep(0.1)


def test_a_model_llama_cpp_refuses_fails_the_request_not_the_server(world, tmp_path: Path) -> None:
    srv, bin_dir, _merged, root = world
    write_split_model(tmp_path, "broken", 1)
    shard = tmp_path / "broken-00001-of-00001.gguf"
    edit_metadata(shard, values={"llama.block_count": 3})  # a block llama.cpp will look for and not find
    refused = llama(bin_dir, "llama-simple", "-m", str(shard), "-n", "1", "x")
    assert refused.returncode != 0
    (tmp_path / "Modelfile").write_text(f"FROM {shard}\n", encoding="utf-8")
    assert srv.cli("create", "broken", "-f", str(tmp_path / "Modelfile")).returncode == 0
    answer = srv.http.post("/api/generate", json={"model": "broken", "prompt": "x", "stream": False}, timeout=120)
    assert answer.status_code == 500
    error = answer.json()["error"]
    # The rest of the runner's output chunk follows (llm/status.go cuts the chunk, not the line).
    assert error.startswith("llama runner process has terminated: error loading model: missing tensor 'blk.2.attn_norm.weight'"), error
    assert srv.http.get("/").status_code == 200


def test_a_model_without_tokens_crashes_serve_like_ollama_0_5_7(tmp_path: Path, world) -> None:
    _srv, _bin_dir, _merged, root = world
    write_split_model(tmp_path, "notok", 1)
    shard = tmp_path / "notok-00001-of-00001.gguf"
    edit_metadata(shard, drop=("tokenizer.ggml.tokens",))
    (tmp_path / "Modelfile").write_text(f"FROM {shard}\n", encoding="utf-8")
    srv = ReleaseServer(tmp_path / "models", root / "release" / "bin" / "ollama")
    try:
        assert srv.cli("create", "notok", "-f", str(tmp_path / "Modelfile")).returncode == 0  # create accepts it
        try:
            srv.http.post("/api/generate", json={"model": "notok", "prompt": "x"}, timeout=60)
        except Exception:  # noqa: BLE001 - the connection dies with the server
            pass
        srv.process.wait(timeout=30)
    finally:
        code, log = srv.stop()
    assert code == 2
    assert "panic: interface conversion: interface {} is nil, not *llm.array" in log


def test_a_client_that_hangs_up_mid_answer_ends_its_request_not_the_model(world) -> None:
    """Go cancels the request's context; the runner frees the sequence and the
    model stays loaded (what a proxy in front of ollama relies on)."""
    srv, _bin_dir, _merged, _root = world
    srv.http.post("/api/generate", json={"model": "tiny", "keep_alive": -1}, timeout=120)
    starts = srv.log.read_text().count("starting llama server")
    with srv.http.stream("POST", "/api/generate", json={"model": "tiny", "prompt": PROMPT, "options": {"num_predict": 2000}},
                         timeout=120) as streamed:
        for line in streamed.iter_lines():
            if line:
                break  # the first piece, then hang up
    answer = srv.http.post("/api/generate", json={"model": "tiny", "prompt": PROMPT, "stream": False}, timeout=120).json()
    assert answer["done"] is True and answer["eval_count"] == 8
    assert [m["name"] for m in srv.http.get("/api/ps").json()["models"]] == ["tiny:latest"]
    assert srv.log.read_text().count("starting llama server") == starts, "no reload"
