#!/usr/bin/env bash
# The GPU paths checked in one script (benchmarks/gpu_check.py holds the checks): in bf16 on one CUDA
# GPU, in order, each printing PASS/FAIL with its measured figure and tolerance (exit status 1 if any
# fails; ~3-5 min on an H200, killed past GPU_CHECK_TIMEOUT):
#   1. the cached step against a plain full-batch step: relative L2 error of the flattened gradient
#      against a float64 reference of the same (bf16-rounded) model, at most 2x the plain bf16 step's
#      own error (bf16 keeps 8 significant bits; scalelab/verify.py says why that bound means something);
#   2. CUDA RNG replay with dropout: every replayed micro-batch equals its cached forward bit for bit;
#   3. ZeRO-2 on one GPU: a single-process DeepSpeed engine (world size 1) in bf16 against ZeRO-0 in
#      fp32, 3 steps: updates and gradient norms within 5%. Ray Train is not in it: the GPU machine has
#      no Ray and no network, and Ray's wheel alone is over the 64 MiB a device call carries; the Ray
#      Train path of the same engine (2 workers, ZeRO 0-3, exact against a full-batch step) is
#      tests/train/test_engine.py's, on CPU;
#   4. vit-b16 at global batch 65536 through the gradient cache (tiled loss, block 8192), the micro-batch
#      sized from memory (scalelab/train/memory.py: a probe of 16 and 32 rows measured with
#      torch.cuda.max_memory_allocated, the largest power of two that fits beside the 19.7 GB of resident
#      inputs, model and optimizer state, 10% headroom); 1 warm-up + 2 timed steps; prints samples/s,
#      MFU (3 x forward MACs per sample, `scalelab.train.compute.training_macs`), HFU (4 x forward, what a
#      cached step executes), peak and predicted GPU memory.
#
#   bash benchmarks/gpu_check.sh                # on a machine with one NVIDIA GPU
#   bash benchmarks/gpu_check.sh --dry-run-cpu  # here, no GPU: the same code on CPU, still bf16, pico for
#                                               # checks 1-3 and tiny at B=64 for the big step (< 1 min)
# On this workplace's lent GPU machine (no network), after `bash benchmarks/gpu_wheels.sh` here (it fills
# the git-ignored .whl/ in the checkout the session started in, which is what a device call sends):
#   run(command="bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log", carry=[".whl"], timeout_s=540)
#
# Knobs (environment): PRESET=vit-b16 BATCH=65536 MICRO=auto (or a number) BLOCK=8192 ZERO=2 WARMUP=1
# STEPS=2 CHECK_PRESET=tiny (checks 1-3) PEAK_FLOPS=989e12 (H200 / H100 SXM bf16 dense; A100: 312e12)
# MEMORY_GB (plan the micro-batch in this much memory instead of the GPU's) MASTER_PORT=29517
# GPU_CHECK_TIMEOUT=480 (seconds; the Python part is killed past it).
#
# Environment: uses .venv when its torch sees CUDA, else the machine's python3 (GPU images ship their
# own CUDA torch and timm). What it lacks of deepspeed / pydantic is installed from .whl/ when present
# (`pip install --no-index --no-deps --target /tmp/site`, /tmp/site on PYTHONPATH: the machine's torch
# is never touched), else from the package index into the same folder. scalelab itself is taken from
# platform/ through PYTHONPATH (no install).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run-cpu) DRY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run-cpu or nothing)" >&2; exit 2 ;;
  esac
done

export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}

if [ "$DRY" = 1 ]; then
  test -x "$PY" || { echo "--dry-run-cpu uses the existing .venv (make venv)" >&2; exit 1; }
  # MEMORY_GB: a budget that makes the plan choose a micro-batch below the batch (16 or 32 of 64 rows).
  export DS_ACCELERATOR=cpu PRESET=tiny CHECK_PRESET=pico BATCH=64 MICRO=auto MEMORY_GB=0.03 BLOCK=32 \
    WARMUP=1 STEPS=1 OMP_NUM_THREADS=2
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  has_cuda='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
  if ! { test -x "$PY" && "$PY" -c "$has_cuda" 2>/dev/null; }; then
    PY=python3  # .venv missing or without a CUDA torch: the machine's own Python
    "$PY" -c "$has_cuda" || { echo "no CUDA torch in .venv or the system python3" >&2; exit 1; }
  fi
  if ! "$PY" -c 'import deepspeed, pydantic, yaml, timm' 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
      echo "== installing from .whl/: $(cd .whl && ls | tr '\n' ' ')"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl
    else
      pins=$(grep -i -E '^(deepspeed|pydantic|pydantic_core|annotated-types|typing-inspection|hjson)==' \
        constraints.txt | tr '\n' ' ')
      echo "== no .whl/ (bash benchmarks/gpu_wheels.sh makes it): installing $pins from the package index"
      # shellcheck disable=SC2086
      DS_BUILD_OPS=0 "$PY" -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/site $pins
    fi
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
fi

# Single-process "distributed" run: DeepSpeed's init_distributed reads these (world size 1).
export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29517}" RANK=0 LOCAL_RANK=0 WORLD_SIZE=1

timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py
