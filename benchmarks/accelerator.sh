#!/usr/bin/env bash
# The accelerator figures of README ("On a GPU"), in one call of about 9 minutes on one NVIDIA H200:
#
#   bash benchmarks/accelerator.sh [OUT_DIR]          # logs: OUT_DIR/accelerator.log (default runs/accelerator)
#   PY=.venv/bin/python QUICK=1 bash benchmarks/accelerator.sh /tmp/acc   # the same plumbing in a minute on a CPU
#
# Each benchmark runs under its own time limit and a failure does not stop the others; every line also goes to
# OUT_DIR/accelerator.log. The benchmarks need only jax, flax, optax, numpy, tqdm, absl and ml_collections.
set -u
OUT_DIR=${1:-runs/accelerator}
PY=${PY:-python3}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/accelerator.log"
export PYTHONUNBUFFERED=1
# XLA's own GPU allocator would reserve 75% of the card at start; on demand, peak use is what the process needs.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TQDM_DISABLE=1  # the k-means' per-layer bars would fill the log

bench() {  # bench NAME SECONDS MODULE ARGS...
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name: python -m $* (limit ${limit}s)"
  start=$(date +%s)
  timeout "$limit" "$PY" -m "$@" 2>&1
  rc=$?
  echo "=== $name: exit $rc, $(($(date +%s) - start)) s wall"
}

{
  date -u
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
  if [ -n "${QUICK:-}" ]; then  # plumbing check: the smallest model, one step
    bench scan 300 benchmarks.scan_blocks --model DiT-S/2 --batch 2 --sampler-batch 2 --steps 1 --remat blocks \
      --skip-unrolled --skip-fp-step --repeats 1
    bench sampler 300 benchmarks.sampler_speed --model DiT-S/2 --batch 2 --steps 2 --repeats 1 --iters 1 --k 16 --d 4
    exit 0
  fi
  # DiT-XL/2, scanned: the calibration step (fp training step vs PQ dynamic assignment, remat none and blocks),
  # compile time, step time, XLA peak memory; then a 25-step sampler call, fp vs PQ decoding on the fly.
  bench xl-step 200 benchmarks.scan_blocks --model DiT-XL/2 --batch 8 --remat none,blocks --skip-unrolled \
    --skip-sampler --repeats 3
  bench xl-sampler-call 110 benchmarks.scan_blocks --model DiT-XL/2 --sampler-batch 8 --steps 25 --skip-unrolled \
    --skip-step --repeats 3
  # DiT-XL/2 sampling throughput at a batch that fills the card better: fp vs PQ dequantized at load vs on the fly.
  bench xl-sampler 130 benchmarks.sampler_speed --model DiT-XL/2 --batch 32 --steps 50 --repeats 2 --iters 2
  # DiT-S/2: scanned vs unrolled.
  bench s-step 70 benchmarks.scan_blocks --model DiT-S/2 --batch 32 --remat blocks --skip-sampler --repeats 5
  date -u
} 2>&1 | tee "$LOG"
