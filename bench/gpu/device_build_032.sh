#!/bin/bash
# device_build_032.sh WORK OUT
#
# Runs ON THE GPU MACHINE (NVIDIA GPU, nvcc 12/13, CMake >= 3.24, ninja, python3
# with numpy), from the repository root. Builds ollama 0.32.15's llama.cpp
# payload there and assembles the release archive builder reads. Carried in
# .gpu/ (see RESULTS-0.32.md, Reproduce):
#   llama.cpp-4df29be4f-ollama-patched.tar.xz  llama.cpp at 4df29be4f (PyPI
#       llama-cpp-python 0.3.35's vendor/llama.cpp) with ollama's
#       llama/compat/001-llama-cpp-hooks.patch applied, without models/ docs/
#       tests/ media/ benches/ gguf-py/ examples/ pocs/ .github/
#   ollama-0.32.15-llama-cmake.tar.xz  ollama v0.32.15's llama/ cmake/
#       LLAMA_CPP_VERSION CMakePresets.json CMakeLists.txt
#   ollama-0.32.15-bin.xz   bin/ollama (Go, built elsewhere: build-ollama-032.sh)
#   llama-b4610-bin-ubuntu-x64.zip  builder's second archive (llama-gguf-split)
#   whl/                     wheels for builder and make_r1_model.py (cp312)
# Idempotent: a second run on the same machine skips what is there.
#   1. wheels into /tmp/site
#   2. CPU preset (all CPU variants, llama-server, llama-quantize) and CUDA
#      preset llama_cuda_v13_user_arch (ggml-cuda, sm_90) configured from the
#      same llama.cpp tree (FETCHCONTENT_SOURCE_DIR_LLAMA_CPP, compat patch
#      already applied: OLLAMA_LLAMA_CPP_SKIP_COMPAT_PATCH=ON), built in
#      parallel; the model (make_r1_model.py) written meanwhile
#   3. WORK/dist = bin/ollama + `cmake --install --component llama-server
#      --strip` of the CPU build + lib/ollama/cuda_v13/libggml-cuda.so
#      (CUDA's own cudart/cublas are NOT bundled: the machine's are used)
#   4. WORK/carried/ollama-linux-amd64.tar.zst (python tarfile + zstandard)
#      beside the b4610 zip
#   5. OUT/: the built payload, compressed, to bring back (lib-cpu.tar.xz,
#      libggml-cuda.so.xz.part-*), and the build logs (logs.tar.gz)
# BLOCKS (env): model blocks (default by free space for create's 2x peak: 14 from 62 GiB, 12 from 53, 10 from 43, else 8).
set -uo pipefail
WORK=${1:?WORK dir}; OUT=${2:?OUT dir}
REPO=$(pwd)
mkdir -p "$WORK"/{src,carried,models} "$OUT"
J=$(nproc)
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,memory.used,memory.free,driver_version --format=csv
nvcc --version | tail -2; cmake --version | head -1; echo "ninja $(ninja --version)"; gcc --version | head -1
lscpu | grep -E '^Model name|^CPU\(s\)' ; ldd --version | head -1
df -h "$WORK" /tmp | cat
grep -E 'MemTotal|MemAvailable|SwapFree' /proc/meminfo
ls /usr/local/cuda/lib64/ | grep -E '^lib(cudart|cublas|cublasLt)\.so\.[0-9]+$' || true

# Some of these VMs start with little RAM and grow it as it is used (device_setup.sh does the same):
# builder's plan compares the CPU part of the model with MemAvailable, so grow it first.
python3 bench/gpu/grow_ram.py
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
say "wheels in"

ARCHIVE=$WORK/carried/ollama-linux-amd64.tar.zst
if [ ! -s "$ARCHIVE" ]; then
  [ -d "$WORK/src/llama.cpp" ] || tar -xJf .gpu/llama.cpp-4df29be4f-ollama-patched.tar.xz -C "$WORK/src"
  mkdir -p "$WORK/src/ollama" && tar -xJf .gpu/ollama-0.32.15-llama-cmake.tar.xz -C "$WORK/src/ollama"
  COMMON=(-G Ninja "-DFETCHCONTENT_SOURCE_DIR_LLAMA_CPP=$WORK/src/llama.cpp" -DOLLAMA_LLAMA_CPP_SKIP_COMPAT_PATCH=ON)
  ( cd "$WORK/src/ollama" && cmake -S llama/server --preset llama_cuda_v13_user_arch -B "$WORK/bcuda" "${COMMON[@]}" \
      -DCMAKE_CUDA_ARCHITECTURES=90 > "$WORK/cfg-cuda.log" 2>&1 ) || { tail -30 "$WORK/cfg-cuda.log"; exit 1; }
  if [ -s .gpu/lib-cpu-local.tar.xz ]; then
    # the CPU payload built elsewhere from the same two trees (build-cpu-032.sh): only CUDA is built here
    echo "CPU payload: carried .gpu/lib-cpu-local.tar.xz (not built here)"; echo "rc 0 carried" > "$WORK/cpu.done"; : > "$WORK/cfg-cpu.log"; : > "$WORK/build-cpu.log"
  else
    ( cd "$WORK/src/ollama" && cmake -S llama/server --preset cpu -B "$WORK/bcpu" "${COMMON[@]}" > "$WORK/cfg-cpu.log" 2>&1 ) \
        || { tail -30 "$WORK/cfg-cpu.log"; exit 1; }
  fi
  say "configured"
  ( s=$(date +%s); cmake --build "$WORK/bcuda" --target ggml-cuda -j "$J" > "$WORK/build-cuda.log" 2>&1; echo "rc $? in $(( $(date +%s) - s )) s" > "$WORK/cuda.done" ) &
  if [ ! -s .gpu/lib-cpu-local.tar.xz ]; then
    VARIANTS=$(grep -o 'Adding CPU backend variant ggml-cpu-[a-z0-9_]*' "$WORK/cfg-cpu.log" | awk '{print $5}' | tr '\n' ' ')
    echo "CPU variants: $VARIANTS"
    ( s=$(date +%s); cmake --build "$WORK/bcpu" --target llama-server llama-quantize $VARIANTS -j "$J" > "$WORK/build-cpu.log" 2>&1; echo "rc $? in $(( $(date +%s) - s )) s" > "$WORK/cpu.done" ) &
  fi
fi

if [ -z "${BLOCKS:-}" ]; then
  free_g=$(df -BG --output=avail "$WORK" | tail -1 | tr -dc 0-9)
  BLOCKS=$( [ "$free_g" -ge 62 ] && echo 14 || { [ "$free_g" -ge 53 ] && echo 12 || { [ "$free_g" -ge 43 ] && echo 10 || echo 8; }; } )
fi
echo "BLOCKS=$BLOCKS" > "$WORK/blocks"
if [ ! -s "$WORK/models/r1-${BLOCKS}b/r1-${BLOCKS}b-00003-of-00003.gguf" ]; then
  python3 bench/gpu/make_r1_model.py "$WORK/models" --blocks "$BLOCKS" | tail -2
fi
say "model r1-${BLOCKS}b written"

if [ ! -s "$ARCHIVE" ]; then
  wait
  echo "cuda: $(cat "$WORK/cuda.done")  cpu: $(cat "$WORK/cpu.done")"
  grep -q '^rc 0' "$WORK/cuda.done" || { tail -40 "$WORK/build-cuda.log"; exit 1; }
  grep -q '^rc 0' "$WORK/cpu.done" || { tail -40 "$WORK/build-cpu.log"; exit 1; }
  say "built"
  rm -rf "$WORK/dist" && mkdir -p "$WORK/dist/bin" "$WORK/dist/lib/ollama/cuda_v13"
  if [ -s .gpu/lib-cpu-local.tar.xz ]; then
    tar -xJf .gpu/lib-cpu-local.tar.xz -C "$WORK/dist" && echo "carried CPU payload unpacked" > "$WORK/install-cpu.log"
  else
    cmake --install "$WORK/bcpu" --component llama-server --strip --prefix "$WORK/dist" > "$WORK/install-cpu.log" 2>&1 \
        || { tail -20 "$WORK/install-cpu.log"; exit 1; }
  fi
  cp "$WORK/bcuda/bin/libggml-cuda.so" "$WORK/dist/lib/ollama/cuda_v13/" && strip --strip-unneeded "$WORK/dist/lib/ollama/cuda_v13/libggml-cuda.so"
  xz -dc .gpu/ollama-0.32.15-bin.xz > "$WORK/dist/bin/ollama"
  chmod 755 "$WORK/dist/bin/ollama" "$WORK/dist/lib/ollama/llama-server" "$WORK/dist/lib/ollama/llama-quantize"
  (cd "$WORK/dist" && find . -type f -printf '%10s %p\n' | sort -k2)
  readelf -d "$WORK/dist/lib/ollama/cuda_v13/libggml-cuda.so" | grep -E 'NEEDED|RUNPATH'
  python3 - "$WORK/dist" "$ARCHIVE" <<'PY'
import sys, tarfile, zstandard, os
src, dst = sys.argv[1], sys.argv[2]
with open(dst + ".part", "wb") as f:
    with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(f) as z:
        with tarfile.open(fileobj=z, mode="w|") as t:
            for d in ("bin", "lib"):
                t.add(os.path.join(src, d), arcname="./" + d, filter=lambda i: (setattr(i, "uid", 0), setattr(i, "gid", 0), setattr(i, "uname", "root"), setattr(i, "gname", "root"), i)[-1])
os.rename(dst + ".part", dst)
print("archive", dst, os.path.getsize(dst))
PY
  cp .gpu/llama-b4610-bin-ubuntu-x64.zip "$WORK/carried/"
  say "archive assembled"
  # bring back the payload (each file < 16 MiB); NO_PAYLOAD=1 (env) skips it
  [ -n "${NO_PAYLOAD:-}" ] || [ -s .gpu/lib-cpu-local.tar.xz ] || tar -C "$WORK/dist" --exclude=./lib/ollama/cuda_v13 -cf - ./lib | xz -T0 -6 > "$OUT/lib-cpu.tar.xz"
  [ -n "${NO_PAYLOAD:-}" ] || xz -T0 -6 -c "$WORK/dist/lib/ollama/cuda_v13/libggml-cuda.so" | split -b 15m - "$OUT/libggml-cuda.so.xz.part-"
  tar -C "$WORK" -czf "$OUT/logs.tar.gz" cfg-cuda.log cfg-cpu.log build-cuda.log build-cpu.log install-cpu.log cuda.done cpu.done 2>/dev/null
  ls -la "$OUT"
  say "payload packed"
fi
ls -la "$WORK/carried"
df -h "$WORK" | tail -1
say "device_build_032 done"
