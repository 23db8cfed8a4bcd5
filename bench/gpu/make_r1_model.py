#!/usr/bin/env python3
"""make_r1_model.py: a DeepSeek-R1-shaped GGUF with fewer blocks, zero weights,
in 3 split shards, written sparse (the data costs no disk).

Runs anywhere with Python 3.10+, numpy and gguf-py (pip `gguf`); run from the
repository root (it imports tests/fixtures/deepseek_headers.py for R1's tensor
names, shapes and quant types: the same layout the planner was fitted to).
On the GPU machine it runs from the carried tree with the carried gguf wheel.

    python3 bench/gpu/make_r1_model.py OUT_DIR [--blocks 14] [--experts IQ1_M] [--shards 3]

Writes OUT_DIR/r1-<blocks>b/r1-<blocks>b-0000k-of-00003.gguf:
- deepseek2, R1's metadata (7168 wide, 128 heads, MLA ranks 1536/512,
  256 experts of 2048, 8 used, 1 shared, sigmoid gating with exp_probs_b,
  YaRN x40), `blocks` blocks of which the first 3 dense;
- every tensor of those blocks with R1's name, shape and type (Unsloth's
  dynamic quant: routed experts at --experts, the rest Q4_K/Q6_K/F32),
  the token embeddings and the output head;
- a BPE ("gpt2") tokenizer of 129280 tokens that llama.cpp and ollama 0.5.7
  accept: pre "deepseek-v3", the 256 byte tokens in GPT-2's byte-to-unicode
  order, R1's special tokens (bos/eos/pad/User/Assistant) as control tokens,
  the 65536 two-byte tokens with their merges, then filler tokens; and a
  chat template;
- split.no / split.count / split.tensors.count as llama-gguf-split writes
  them; each shard ends at its last tensor's padded end (as gguf-split).
Every weight is zero: the file is extended with truncate(), so a 30 GB model
takes a few MB of disk until something copies it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.fixtures import deepseek_headers as R1  # noqa: E402

T = gguf.GGMLQuantizationType
FILE_TYPE = {"IQ1_S": 24, "IQ1_M": 31, "IQ2_XXS": 19, "Q2_K": 10}  # llama_ftype
SPECIALS = [  # (text, token type): R1's, control tokens
    ("<｜begin▁of▁sentence｜>", 3),
    ("<｜end▁of▁sentence｜>", 3),
    ("<｜▁pad▁｜>", 3),
    ("<｜User｜>", 3),
    ("<｜Assistant｜>", 3),
    ("<think>", 1),
    ("</think>", 1),
]
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def vocabulary(size: int) -> tuple[list[str], list[int], list[str]]:
    chars = byte_chars()
    tokens = list(chars)
    types = [1] * 256
    for text, kind in SPECIALS:
        tokens.append(text)
        types.append(kind)
    merges = []
    for a in chars:
        for b in chars:
            if len(tokens) >= size:
                break
            tokens.append(a + b)
            types.append(1)
            merges.append(f"{a} {b}")
    i = 0
    while len(tokens) < size:
        tokens.append(f"<filler_{i}>")
        types.append(1)
        i += 1
    assert len(set(tokens)) == size
    return tokens, types, merges


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--blocks", type=int, default=14)
    ap.add_argument("--experts", default="IQ1_M", choices=sorted(FILE_TYPE))
    ap.add_argument("--shards", type=int, default=3)
    args = ap.parse_args()

    R1.BLOCKS = args.blocks  # tensors_for() reads the module's block count
    tensors = R1.tensors_for(T[args.experts])
    name = f"r1-{args.blocks}b"
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    tokens, types, merges = vocabulary(R1.VOCAB)
    bos, eos, pad = 256, 257, 258

    # about equal bytes per shard, cut between tensors (as gguf-split --split-max-size)
    def nbytes(t):
        return R1._q_bytes(t[2], int(np.prod(t[1])))

    total = sum(nbytes(t) for t in tensors)
    cuts, acc, chunk, chunks = total / args.shards, 0, [], []
    for t in tensors:
        if chunk and acc >= cuts * (len(chunks) + 1) and len(chunks) < args.shards - 1:
            chunks.append(chunk)
            chunk = []
        chunk.append(t)
        acc += nbytes(t)
    chunks.append(chunk)
    assert len(chunks) == args.shards, len(chunks)

    paths = []
    for index, chunk in enumerate(chunks):
        path = folder / f"{name}-{index + 1:05d}-of-{args.shards:05d}.gguf"
        path.unlink(missing_ok=True)
        w = gguf.GGUFWriter(str(path), "deepseek2" if index == 0 else None)
        if index == 0:
            w.add_name(f"DeepSeek-R1 layout, {args.blocks} blocks, {args.experts}, zero weights")
            w.add_file_type(FILE_TYPE[args.experts])
            w.add_block_count(args.blocks)
            w.add_context_length(163840)
            w.add_embedding_length(R1.EMBD)
            w.add_feed_forward_length(R1.FF)
            w.add_head_count(R1.HEADS)
            w.add_head_count_kv(R1.HEADS)
            w.add_rope_freq_base(10000.0)
            w.add_layer_norm_rms_eps(1e-6)
            w.add_expert_used_count(R1.USED)
            w.add_leading_dense_block_count(R1.DENSE)
            w.add_vocab_size(R1.VOCAB)
            w.add_q_lora_rank(R1.Q_LORA)
            w.add_kv_lora_rank(R1.KV_LORA)
            w.add_key_length(R1.KEY)
            w.add_value_length(R1.VALUE)
            w.add_expert_feed_forward_length(R1.FF_EXPERT)
            w.add_expert_count(R1.EXPERTS)
            w.add_expert_shared_count(1)
            w.add_expert_weights_scale(2.5)
            w.add_expert_weights_norm(True)
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
            w.add_rope_dimension_count(R1.ROPE)
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(40.0)
            w.add_rope_scaling_orig_ctx_len(4096)
            w.add_rope_scaling_yarn_log_mul(0.1)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("deepseek-v3")
            w.add_token_list(tokens)
            w.add_token_types(types)
            w.add_token_merges(merges)
            w.add_bos_token_id(bos)
            w.add_eos_token_id(eos)
            w.add_pad_token_id(pad)
            w.add_add_bos_token(True)
            w.add_add_eos_token(False)
            w.add_chat_template(CHAT_TEMPLATE)
            w.add_quantization_version(2)
        w.add_uint16("split.no", index)
        w.add_uint16("split.count", args.shards)
        w.add_int32("split.tensors.count", len(tensors))
        for tname, shape, kind in chunk:
            block, size = gguf.constants.GGML_QUANT_SIZES[kind]
            byte_shape = (*reversed(shape[1:]), shape[0] // block * size)
            w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), R1._q_bytes(kind, int(np.prod(shape))), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        align = w.data_alignment
        header = os.path.getsize(path)
        data = sum(gguf.GGUFWriter.ggml_pad(R1._q_bytes(k, int(np.prod(s))), align) for _, s, k in chunk)
        os.truncate(path, gguf.GGUFWriter.ggml_pad(header, align) + data)
        paths.append(path)
        print(f"{path}: {len(chunk)} tensors, {os.path.getsize(path) / 2**30:.2f} GiB (header {header} bytes)")
    print(f"total {total / 2**30:.2f} GiB of tensor data, {len(tensors)} tensors, {args.blocks} blocks")
    print(paths[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
