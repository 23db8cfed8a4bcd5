"""Will ollama load this model? Checks on the GGUF headers alone.

ollama's `create` accepts any GGUF file; loading happens at the first
request, and a model ollama cannot load crashes its server there (0.5.7
panics in `llm.GGML.GraphSize` when `tokenizer.ggml.tokens` is missing) or
fails in llama.cpp's loader. These checks run on the shards' headers (never
their data) before anything is merged, on the host (`validate`, `plan`,
`up`) and in the image (the merge step). Standard library only.
"""

from __future__ import annotations

from typing import Sequence

from .common import CURRENT, LEGACY
from .gguf import GGUFHeader

# The architectures the llama.cpp of each ollama generation knows (LLM_ARCH_NAMES):
#   "0.5": ollama v0.5.7's vendored llama/llama-arch.cpp.
#   "0.30": ollama 0.30+ builds llama.cpp's own llama-server from the build in
#     its LLAMA_CPP_VERSION file (b10488 at v0.32.15), no longer vendored. This
#     list is src/llama-arch.cpp at llama.cpp commit 00395eb, the newest copy at
#     hand (b10488's own could not be fetched), less "clip" (only llama-quantize
#     uses it). ollama 0.32.15's code names deepseek2, llama, gpt-oss, glm4,
#     laguna, qwen35 and gemma4 among them.
ARCHITECTURES: dict[str, frozenset[str]] = {
    CURRENT: frozenset(
        (
            "llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert "
            "nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2 "
            "qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe phi2 phi3 phimoe plamo "
            "plamo2 plamo3 codeshell orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n gemma4 "
            "gemma4-assistant gemma-embedding starcoder2 mamba mamba2 jamba falcon-h1 xverse command-r cohere2 "
            "cohere2moe dbrx olmo olmo2 olmoe openelm arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4 "
            "chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2 nemotron nemotron_h nemotron_h_moe exaone "
            "exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite granitemoe granitehybrid chameleon "
            "wavtokenizer-dec plm bailingmoe bailingmoe2 dots1 arcee afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe "
            "hunyuan-dense hunyuan_vl hy_v3 smollm3 gpt-oss lfm2 lfm2moe dream smallthinker llada llada-moe seed_oss "
            "grovemoe apertus minimax-m2 cogvlm rnd1 pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2 "
            "step35 llama-embed maincoder kimi-linear talkie mellum"
        ).split()
    ),
    LEGACY: frozenset(
        (
            "llama mllama deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert nomic-bert "
            "jina-bert-v2 bloom stablelm qwen qwen2 qwen2moe qwen2vl phi2 phi3 plamo codeshell orion internlm2 "
            "minicpm minicpm3 gemma gemma2 starcoder2 mamba xverse command-r cohere2 dbrx olmo olmo2 olmoe openelm "
            "arctic deepseek deepseek2 chatglm bitnet t5 t5encoder jais nemotron exaone rwkv6 granite granitemoe "
            "chameleon solar wavtokenizer-dec"
        ).split()
    ),
}
OLLAMA_NAMES = {LEGACY: "ollama 0.5.7", CURRENT: "ollama 0.30+"}


class NotLoadable(ValueError):
    """One line: the file, the key, what is wrong and what to do."""


def check_loadable(files: Sequence[tuple[str, GGUFHeader]], generation: str = LEGACY) -> str:
    """Refuse a model (its shards, in order, or one file) that ollama of
    `generation` cannot load; return its architecture."""
    ollama = OLLAMA_NAMES[generation]
    first, header = files[0]
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise NotLoadable(f"{first}: general.architecture is missing; {ollama} cannot load a model without it (convert it again with llama.cpp's convert_hf_to_gguf.py)")
    if arch not in ARCHITECTURES[generation]:
        raise NotLoadable(
            f"{first}: general.architecture {arch!r} is not one {ollama}'s llama.cpp knows; use a newer ollama.version or another model"
        )
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if key not in meta:
            raise NotLoadable(f"{first}: {key} is missing: the model has no tokenizer and {ollama} crashes at the first request; convert it again with its tokenizer")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = len(tokens) if isinstance(tokens, list) else tokens
    embedding = _find(files, "token_embd.weight")
    if embedding is None:
        raise NotLoadable(f"{first}: token_embd.weight is in no shard; the model is incomplete")
    path, shape = embedding
    if len(shape) < 2 or shape[1] != vocab:
        rows = shape[1] if len(shape) >= 2 else 1
        raise NotLoadable(
            f"{path}: tokenizer.ggml.tokens has {vocab} tokens but token_embd.weight has {rows} rows; the tokenizer belongs to another model"
        )
    key = f"{arch}.block_count"
    blocks = meta.get(key)
    if not isinstance(blocks, int) or isinstance(blocks, bool):
        raise NotLoadable(f"{first}: {key} is missing; {ollama} cannot place the layers without it")
    found = sorted(_blocks(files))
    if found != list(range(blocks)):
        missing = sorted(set(range(blocks)) - set(found))
        extra = sorted(set(found) - set(range(blocks)))
        detail = []
        if missing:
            detail.append(f"no tensors for block(s) {_ranges(missing)}")
        if extra:
            detail.append(f"tensors for block(s) {_ranges(extra)} beyond it")
        raise NotLoadable(f"{first}: {key} is {blocks} but the shards hold {'; '.join(detail)}; a shard belongs to another model")
    return arch


def _find(files: Sequence[tuple[str, GGUFHeader]], name: str) -> tuple[str, tuple[int, ...]] | None:
    for path, header in files:
        for tensor in header.tensors:
            if tensor.name == name:
                return path, tensor.shape
    return None


def _blocks(files: Sequence[tuple[str, GGUFHeader]]) -> set[int]:
    found = set()
    for _, header in files:
        for tensor in header.tensors:
            if tensor.name.startswith("blk."):
                number = tensor.name.split(".", 2)[1]
                if number.isdigit():
                    found.add(int(number))
    return found


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    parts: list[str] = []
    start = prev = numbers[0]
    for number in numbers[1:] + [None]:  # type: ignore[list-item]
        if number is not None and number == prev + 1:
            prev = number
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if number is not None:
            start = prev = number
    return ", ".join(parts)
