#!/bin/bash
# run_cases.sh WORK OUT [run_cases.py options...]
#
# Runs ON THE GPU MACHINE, from the repository root: the whole measurement.
#   1. device_setup.sh WORK   (wheels, libggml_cuda_v12.so built with nvcc,
#      the release archive, the model; skips what a previous run left)
#   2. CUDA's libraries made findable by ld.so without LD_LIBRARY_PATH
#      (builder's supervisor starts ollama without LD_LIBRARY_PATH)
#   3. run_cases.py --work WORK --out OUT OPTIONS (cards, ctx, searches)
#   4. copies the serve log (gzip) to OUT
# Needs what device_setup.sh and run_cases.py say. Kills nothing it did not
# start: run_cases.py stops the holder and calls `builder down` itself.
# END_EPOCH (env): wall-clock end for run_cases.py (no new case or probe
# after it, minus margins).
set -uo pipefail
WORK=${1:?WORK}; OUT=${2:?OUT}; shift 2
mkdir -p "$WORK" "$OUT"
bash bench/gpu/device_setup.sh "$WORK" 2>&1 | tee -a "$OUT/setup.txt" || exit 1

echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
ldconfig -p | grep -E 'libcuda\.so\.1|libcudart\.so|libcublas(Lt)?\.so' || true
CONF=/etc/ld.so.conf.d/zz-gpubench-cuda.conf
if ! ldconfig -p | grep -q 'libcuda\.so\.1 ' || ! ldconfig -p | grep -q 'libcublasLt\.so\.'; then
  cuda=$(for d in ${LD_LIBRARY_PATH//:/ } /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
           [ -e "$d/libcuda.so.1" ] && echo "$d" && break; done)
  printf '%s\n' /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib64 ${cuda:+"$cuda"} > "$CONF"
  ldconfig
  echo "ld.so: added $(tr '\n' ' ' < "$CONF")"
  # ollama 0.5.7 looks for the driver's libcuda.so* by globs (/usr/lib/*-linux-gnu/, /usr/local/lib*/, ...)
  if [ -n "$cuda" ] && ! ls /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/local/lib/libcuda.so* >/dev/null 2>&1; then
    ln -sf "$cuda/libcuda.so.1" /usr/local/lib/libcuda.so.1 && echo "linked /usr/local/lib/libcuda.so.1 -> $cuda/libcuda.so.1"
  fi
  ldconfig -p | grep -E 'libcuda\.so\.1|libcudart\.so|libcublasLt\.so' || true
fi

export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# the live checkout's builder, unless it does not import (another engineer may be mid-edit):
# then the last commit's, carried as .gpu/builder-head (git archive HEAD builder ...)
# (BENCH_USE_HEAD=1: always the carried copy, so edits in progress in the checkout play no part)
if [ -n "${BENCH_USE_HEAD:-}" ] || ! python3 -c 'import builder.cli, builder.targets.host, builder.preflight.report' 2>&1; then
  echo "using .gpu/builder-head (HEAD $(cat .gpu/builder-head/HEAD 2>/dev/null)), not the checkout's builder"
  export BENCH_BUILDER_ROOT=$PWD/.gpu/builder-head PYTHONPATH=/tmp/site:$PWD/.gpu/builder-head
fi
python3 -c 'import builder; print("builder", builder.__version__, builder.__file__)' || true
python3 bench/gpu/run_cases.py --work "$WORK" --out "$OUT" ${END_EPOCH:+--end-epoch "$END_EPOCH"} "$@"
rc=$?
gzip -c "$WORK/prefix/run/serve.log" > "$OUT/serve.log.gz" 2>/dev/null || true
df -h "$WORK" | tail -1
exit $rc
