#!/bin/bash
# device_setup.sh WORK
#
# Runs ON THE GPU MACHINE (NVIDIA GPU, CUDA's nvcc 12 or 13, make, python3
# with numpy), from the repository root, after build-cuda-runner.sh ran on a
# machine with Go and its outputs were carried in (.gpu/cuda-runner/,
# .gpu/ollama-0.5.7-linux-amd64.tgz = the CPU build of the same tree,
# .gpu/llama-b4610-bin-ubuntu-x64.zip, .whl/ for missing Python packages).
# Idempotent: a second run on the same machine skips what is there.
#   1. pip-installs the carried wheels into /tmp/site (export PYTHONPATH after)
#   2. builds the real libggml_cuda_v12.so with nvcc from the 0.5.7 tree's
#      llama/, make/, Makefile (OLLAMA_FAST_BUILD=1: no flash-attention
#      kernels, which ollama 0.5.7 leaves off unless OLLAMA_FLASH_ATTENTION=1)
#   3. assembles WORK/carried/ollama-linux-amd64.tgz as the release archive is
#      laid out (./bin/ollama, ./lib/ollama/runners/{cpu_avx,cpu_avx2,
#      cuda_v12_avx}/...) beside the llama.cpp zip, for `builder up --offline
#      --from WORK/carried`
#   4. writes the R1-shaped model (make_r1_model.py) under WORK/models
set -euo pipefail
WORK=${1:?WORK dir}
REPO=$(pwd)
mkdir -p "$WORK"/{carried,models,src,dist}
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,memory.used,memory.free,driver_version --format=csv
nvcc --version | tail -2
ls /usr/local/cuda/lib64/ | grep -E '^lib(cudart|cublas|cublasLt)\.so\.[0-9]+$' || true
df -h "$WORK" | tail -1
grep -E 'MemTotal|MemAvailable|SwapFree' /proc/meminfo
# Some of these VMs start with little RAM and grow it as it is used (H200.md): ollama 0.5.7
# and builder both compare the CPU part of the model with MemAvailable, so grow it first.
python3 bench/gpu/grow_ram.py

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl

LIB=$WORK/src/llama/build/linux-amd64/runners/cuda_v12_avx/libggml_cuda_v12.so
if [ ! -s "$LIB" ]; then
  tar -xzf .gpu/cuda-runner/src-cuda-lib.tar.gz -C "$WORK/src"
  ( cd "$WORK/src" && make -f make/Makefile.cuda_v12 -j "$(nproc)" VERSION=0.5.7 OLLAMA_FAST_BUILD=1 \
      CUDA_12_PATH=/usr/local/cuda CUDA_12_COMPILER=/usr/local/cuda/bin/nvcc \
      CUDA_12_LIB_DIR=/usr/local/cuda/lib64 CUDA_ARCHITECTURES=90 \
      "GPU_RUNNER_DRIVER_LIB_LINK=-L/usr/local/cuda/lib64/stubs -lcuda" \
      llama/build/linux-amd64/runners/cuda_v12_avx/libggml_cuda_v12.so > "$WORK/build-lib.log" 2>&1 ) \
    || { tail -40 "$WORK/build-lib.log"; exit 1; }
  strip --strip-unneeded "$LIB" || true
  echo "libggml_cuda_v12.so built in $(( $(date +%s) - t0 )) s"
fi
ls -la "$LIB"; readelf -d "$LIB" | grep NEEDED

ARCHIVE=$WORK/carried/ollama-linux-amd64.tgz
if [ ! -s "$ARCHIVE" ]; then
  rm -rf "$WORK/dist" && mkdir -p "$WORK/dist"
  tar -xzf .gpu/ollama-0.5.7-linux-amd64.tgz -C "$WORK/dist"
  R=$WORK/dist/lib/ollama/runners/cuda_v12_avx
  mkdir -p "$R"
  cp .gpu/cuda-runner/ollama_llama_server "$LIB" "$R/"
  chmod 755 "$R"/*
  (cd "$WORK/dist" && find . -type f | sort && tar -c . | gzip -1 > "$ARCHIVE")
  cp .gpu/llama-b4610-bin-ubuntu-x64.zip "$WORK/carried/"
  ls -la "$WORK/carried"
fi

if [ ! -s "$WORK/models/r1-14b/r1-14b-00003-of-00003.gguf" ]; then
  PYTHONPATH=/tmp/site python3 bench/gpu/make_r1_model.py "$WORK/models" --blocks 14
fi
du -sh --apparent-size "$WORK/models"; du -sh "$WORK/models"
echo "setup done in $(( $(date +%s) - t0 )) s"
