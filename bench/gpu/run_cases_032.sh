#!/bin/bash
# run_cases_032.sh WORK OUT [run_cases_032.py options...]
#
# Runs ON THE GPU MACHINE, from the repository root: builder against a real
# ollama 0.32.15 with its CUDA backend.
#   1. device_build_032.sh WORK OUT (skips what a previous run on this machine left)
#   2. CUDA's libraries findable by ld.so (as run_cases.sh does for 0.5.7)
#   3. a smoke test: the built `ollama serve` alone for a few seconds, its GPU
#      discovery lines kept (OUT/smoke-serve.log)
#   4. run_cases_032.py --work WORK --out OUT --blocks BLOCKS OPTIONS
#   5. the serve log (gzip) to OUT
# builder: .gpu/builder-head (git archive HEAD builder ...) when present, so
# edits in progress in the checkout play no part; else the checkout's.
# END_EPOCH (env): wall-clock end for run_cases_032.py.
# WORK must be OUTSIDE the repository (e.g. /tmp/g32): the device's copy of the
# work tree honours .gitignore but not .git/info/exclude, and a second call
# found $PWD/g32 half-gone (no archive, a build folder ninja no longer knew).
set -uo pipefail
WORK=${1:?WORK}; OUT=${2:?OUT}; shift 2
mkdir -p "$WORK" "$OUT"
bash bench/gpu/device_build_032.sh "$WORK" "$OUT" 2>&1 | tee -a "$OUT/setup.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
. "$WORK/blocks"

CONF=/etc/ld.so.conf.d/zz-gpubench-cuda.conf
if ! ldconfig -p | grep -q 'libcuda\.so\.1 ' || ! ldconfig -p | grep -q 'libcublasLt\.so\.13' || ! ldconfig -p | grep -q 'libcudart\.so\.13'; then
  cuda=$(for d in ${LD_LIBRARY_PATH//:/ } /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
           [ -e "$d/libcuda.so.1" ] && echo "$d" && break; done)
  printf '%s\n' /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib64 ${cuda:+"$cuda"} > "$CONF"
  ldconfig
  echo "ld.so: added $(tr '\n' ' ' < "$CONF")"
fi
ldconfig -p | grep -E 'libcuda\.so\.1|libcudart\.so\.13|libcublasLt\.so\.13' || true

export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ -d .gpu/builder-head ]; then
  echo "using .gpu/builder-head (HEAD $(cat .gpu/builder-head/HEAD 2>/dev/null)), not the checkout's builder"
  export BENCH_BUILDER_ROOT=$PWD/.gpu/builder-head PYTHONPATH=/tmp/site:$PWD/.gpu/builder-head
fi
python3 -c 'import builder; print("builder", builder.__version__, builder.__file__)' || true

# smoke: does the built ollama see the GPU (and through which backend directory)?
if [ ! -s "$OUT/smoke-serve.log" ] && [ -x "$WORK/dist/bin/ollama" ]; then
  mkdir -p /tmp/smoke-models
  OLLAMA_HOST=127.0.0.1:11599 OLLAMA_MODELS=/tmp/smoke-models OLLAMA_DEBUG=1 OLLAMA_NO_CLOUD=1 \
    setsid "$WORK/dist/bin/ollama" serve > "$OUT/smoke-serve.log" 2>&1 &
  spid=$!
  for _ in $(seq 40); do sleep 0.5; grep -q 'inference compute\|no compatible GPUs' "$OUT/smoke-serve.log" && break; done
  curl -s 127.0.0.1:11599/api/version; echo
  kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
  grep -iE 'inference compute|library|cuda|gpu|error' "$OUT/smoke-serve.log" | head -20
fi

limit=()
[ -n "${END_EPOCH:-}" ] && limit=(timeout --signal=INT --kill-after=20 $(( END_EPOCH + 45 - $(date +%s) )))
"${limit[@]}" python3 bench/gpu/run_cases_032.py --work "$WORK" --out "$OUT" --blocks "$BLOCKS" ${END_EPOCH:+--end-epoch "$END_EPOCH"} "$@"
rc=$?
gzip -c "$WORK/prefix/run/serve.log" > "$OUT/serve.log.gz" 2>/dev/null || true
df -h "$WORK" | tail -1
# at most 8 files come back: the payload (lib-cpu.tar.xz, libggml-cuda.so.xz.part-*), serve.log.gz, and one bundle of the rest
( cd "$OUT" && files=$(ls | grep -vE '^(lib-cpu\.tar\.xz|libggml-cuda\.so\.xz\.part-.*|serve\.log\.gz|bundle\.tar\.gz)$') \
  && [ -n "$files" ] && tar -czf bundle.tar.gz $files && rm -f $files; ls -la )
exit $rc
