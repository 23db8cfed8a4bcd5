#!/bin/bash
# build-cuda-runner.sh SRC_DIR [OUT_DIR]
#
# Runs HERE (any x86-64 Linux with Go and gcc; no CUDA, no GPU needed).
# Links ollama 0.5.7's CUDA runner (the Go program ./cmd/runner, tags
# avx,cuda,cuda_v12, what make/gpu.make builds as
# runners/cuda_v12_avx/ollama_llama_server) against STUB libraries:
#   libggml_cuda_v12.so  - exports ggml-cuda.h's functions (empty bodies);
#                          the real one is built on the GPU machine with nvcc
#                          (see run_cases.sh) and placed beside the runner
#   libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13
#                        - empty, with the sonames CUDA 13 / the driver have
#                          on the GPU machine, only so the link records them
# Needs: SRC_DIR = an ollama v0.5.7 source tree with a complete vendor/
#        (go build -mod=vendor works offline); Go 1.23 on PATH (or GO=...).
# Writes OUT_DIR (default .gpu/cuda-runner): ollama_llama_server, and
#        src-cuda-lib.tar.gz (the tree's llama/, make/, Makefile: what the
#        GPU machine needs to build the real libggml_cuda_v12.so), and
#        ollama (bin/ollama copied from SRC_DIR/dist if present).
set -euo pipefail
SRC=$(cd "$1" && pwd)
OUT=$(mkdir -p "${2:-.gpu/cuda-runner}" && cd "${2:-.gpu/cuda-runner}" && pwd)
GO=${GO:-go}
export GOTOOLCHAIN=local GOPROXY=off GOSUMDB=off GOFLAGS=-mod=vendor CGO_ENABLED=1
export CGO_CFLAGS_ALLOW='-mfma|-mf16c' CGO_CXXFLAGS_ALLOW='-mfma|-mf16c'
STUB=$OUT/stub
mkdir -p "$STUB"
# the stub ggml-cuda: every function ggml-cuda.h declares, doing nothing
# (only the names matter to the linker: each becomes an empty function)
grep -E '^GGML_BACKEND_API' "$SRC/llama/ggml-cuda.h" \
  | grep -oE 'ggml_backend_[a-z_]*cuda[a-z_]* *\(' | tr -d ' (' | sort -u \
  | sed 's/.*/void &(void) {}/' > "$STUB/ggml_cuda_stub.c"
gcc -shared -fPIC -o "$STUB/libggml_cuda_v12.so" "$STUB/ggml_cuda_stub.c"
echo 'void __builder_stub(void){}' > "$STUB/empty.c"
for so in cuda:1 cudart:13 cublas:13 cublasLt:13; do
  n=${so%%:*} v=${so##*:}
  gcc -shared -fPIC -Wl,-soname,lib$n.so.$v -o "$STUB/lib$n.so" "$STUB/empty.c"
done
cd "$SRC"
start=$(date +%s)
CGO_LDFLAGS="-L$STUB -Wl,--allow-shlib-undefined" \
  $GO build -buildmode=pie \
  "-ldflags=-w -s -X=github.com/ollama/ollama/version.Version=0.5.7" \
  -trimpath -tags avx,cuda,cuda_v12 -o "$OUT/ollama_llama_server" ./cmd/runner
echo "runner linked in $(( $(date +%s) - start )) s"
readelf -d "$OUT/ollama_llama_server" | grep NEEDED
tar -czf "$OUT/src-cuda-lib.tar.gz" --exclude='llama/build' -C "$SRC" llama make Makefile
[ -x "$SRC/dist/linux-amd64/bin/ollama" ] && cp "$SRC/dist/linux-amd64/bin/ollama" "$OUT/ollama" || true
ls -la "$OUT"
