"""The README's main job, as a new user runs it, and the answer it gets.

From a fresh virtual environment with builder installed from its wheel:
`builder init --preset tiny && builder sample-model && builder up`, the
release archives coming through `mirrors.github` (a prefix proxy on
127.0.0.1, the path a user behind a mirror takes). Then the endpoint must
answer with exactly what llama.cpp's own greedy run of the merged file gives:
the ollama double's runner is real llama.cpp, so the model went through
merge -> create -> serve -> a real forward pass."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.engine.conftest import LLAMA_PATH, OLLAMA_PATH, docker, free_port
from tests.fixtures.artifact_server import ArtifactServer
from tests.fixtures.llama_cpp_release import llama_cpp_bin_dir, llama_cpp_release_zip
from tests.fixtures.ollama_release import ollama_release_tgz
from tests.helpers import registry_client_env
from tests.test_sample_model import greedy

pytestmark = pytest.mark.engine
PROMPT = "Why is the sky blue?"


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture
def fresh_builder(tmp_path: Path) -> Path:
    """`builder` from the wheel, in a new venv (its dependencies from this
    Python's site-packages: the test machine has no other index)."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, env=registry_client_env())
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(next(wheels.glob("*.whl")))],
                   check=True, capture_output=True, env=registry_client_env())
    return env_dir / "bin" / "builder"


def test_the_main_job_answers_with_llama_cpp_s_own_greedy_text(tmp_path: Path, fresh_builder: Path, docker_engine) -> None:
    mirror = ArtifactServer(files={
        f"/https://github.com{OLLAMA_PATH}": ollama_release_tgz(),
        f"/https://github.com{LLAMA_PATH}": llama_cpp_release_zip().read_bytes(),
    }).start()
    project = f"bt-{uuid.uuid4().hex[:8]}"
    port = free_port()
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("BUILDER_")}
    env.update(BUILDER_PROJECT=project, BUILDER_SERVE_PORT=str(port), BUILDER_IMAGE_TAG=project,
               BUILDER_CACHE_DIR=str(tmp_path / "cache"), BUILDER_MIRROR_GITHUB=f"{mirror.url}/", NO_PROXY="127.0.0.1")

    def builder(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(fresh_builder), *args], cwd=work, env=env, capture_output=True, text=True, timeout=1200)

    try:
        for argv in (["init", "--preset", "tiny"], ["sample-model"], ["up"]):
            result = builder(*argv)
            assert result.returncode == 0, (argv, result.stderr[-3000:])
        url = f"http://127.0.0.1:{port}"
        assert result.stdout.strip() == f"{url} serves tiny:latest"
        assert all(path.startswith("/https://github.com/") for path, _ in mirror.requests) and mirror.requests

        merged = work / "models" / "tiny" / "tiny.gguf"
        bin_dir = llama_cpp_bin_dir()
        expected, _ = greedy(bin_dir, merged, PROMPT, 8)  # the tiny template is {{ .Prompt }}
        answer = post(f"{url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 8}})
        assert (answer["response"], answer["eval_count"], answer["done_reason"]) == (expected, 8, "length")
        # The preset's own num_predict (16) reaches the runner too.
        full = post(f"{url}/api/generate", {"model": "tiny", "prompt": PROMPT, "stream": False})
        assert full["eval_count"] == 16 and full["response"] == greedy(bin_dir, merged, PROMPT, 16)[0]

        history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": PROMPT}]
        chat_expected, _ = greedy(bin_dir, merged, "hellohi" + PROMPT, 8)  # {{ .Prompt }}{{ .Response }} per turn
        chat = post(f"{url}/api/chat", {"model": "tiny", "messages": history, "stream": False, "options": {"num_predict": 8}})
        assert chat["message"] == {"role": "assistant", "content": chat_expected}
        openai = post(f"{url}/v1/chat/completions", {"model": "tiny", "messages": history, "temperature": 0, "max_tokens": 8})
        assert openai["choices"][0]["message"]["content"] == chat_expected and openai["usage"]["completion_tokens"] == 8
    finally:
        builder("down", "--volumes")
        docker("image", "rm", "-f", f"builder-tiny:{project}", check=False)
        mirror.stop()
