#!/usr/bin/env bash
# One-GPU check of the real thing: the vit-b16 preset, bf16, global batch 65536 through the gradient
# cache (micro-batch 512) with the tiled loss (block 8192), one single-process DeepSpeed engine on CUDA,
# random inputs already on the GPU (no data pipeline). 1 warm-up + 3 timed steps; prints samples/s,
# model FLOP utilisation (MFU: 3 x forward MACs per sample, `scalelab.train.compute.training_macs`),
# hardware FLOP utilisation (HFU: 4 x forward, what a cached step executes) and peak GPU memory.
#
#   bash benchmarks/gpu_check.sh                # on a machine with one NVIDIA GPU (~3-5 min)
#   bash benchmarks/gpu_check.sh --dry-run-cpu  # here, no GPU: same code, tiny preset, small batch, CPU
#
# Knobs (environment): PRESET=vit-b16 BATCH=65536 MICRO=512 TEXT_MICRO=(MICRO) BLOCK=8192 ZERO=2
# WARMUP=1 STEPS=3 PEAK_FLOPS=989e12 (H200 / H100 SXM bf16 dense; A100: 312e12) MASTER_PORT=29517
# GPU_CHECK_TIMEOUT=480 (seconds; the Python part is killed past it). Memory at the defaults, H200
# class GPU: inputs 65536 x 3 x 224 x 224 bf16 = 19.7 GB resident, plus one micro-batch of
# activations (~30 GB at 512) and ~3 GB of model + fp32 master + Adam state; on an 80 GB GPU use
# MICRO=256.
#
# Environment setup: uses .venv when its torch sees CUDA; otherwise (never touching .venv) creates
# build/gpu-venv with --system-site-packages (GPU images ship their own CUDA torch, timm, tokenizers)
# and pip-installs only what is missing of deepspeed / pydantic / pyyaml / timm. scalelab itself is
# taken from platform/ through PYTHONPATH (no install, so pip never tries to replace the machine's torch).
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
export HF_HUB_OFFLINE=1
PY=.venv/bin/python

if [ "$DRY" = 1 ]; then
  test -x "$PY" || { echo "--dry-run-cpu uses the existing .venv (make venv)" >&2; exit 1; }
  export DS_ACCELERATOR=cpu PRESET=tiny BATCH=64 MICRO=16 BLOCK=32 WARMUP=1 STEPS=1 OMP_NUM_THREADS=2
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  has_cuda='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
  if ! { test -x "$PY" && "$PY" -c "$has_cuda"; }; then
    # .venv missing or without a CUDA torch: never touch it; use a venv of our own under build/.
    PY=build/gpu-venv/bin/python
    if ! test -x "$PY"; then
      echo "== creating build/gpu-venv on top of the system Python (keeps the machine's CUDA torch)"
      python3 -m venv --system-site-packages build/gpu-venv
    fi
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA torch in .venv or the system Python"'
  fi
  missing=()
  "$PY" -c 'import deepspeed' 2>/dev/null || missing+=("deepspeed==0.19.8")
  "$PY" -c 'import pydantic' 2>/dev/null || missing+=("pydantic>=2.7")
  "$PY" -c 'import yaml' 2>/dev/null || missing+=("pyyaml>=6")
  "$PY" -c 'import timm' 2>/dev/null || missing+=("timm>=1.0.20")
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    "$PY" -m pip install --quiet "${missing[@]}" || {
      echo "pip install failed (offline machine?): install ${missing[*]} into .venv first" >&2; exit 1; }
  fi
fi

# Single-process "distributed" run: DeepSpeed's init_distributed reads these (world size 1).
export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29517}" RANK=0 LOCAL_RANK=0 WORLD_SIZE=1

timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" - <<'PY'
import os
import statistics
import time

import torch

from scalelab.config import ExperimentConfig, validate
from scalelab.models import create_model, preset_stats
from scalelab.train.compute import step_macs_with_cache, training_macs, utilization
from scalelab.train.engine import build_engine, zero_stage
from scalelab.train.step import train_step

env = os.environ
preset, batch = env.get("PRESET", "vit-b16"), int(env.get("BATCH", 65536))
micro, block = int(env.get("MICRO", 512)), int(env.get("BLOCK", 8192))
text_micro = int(env.get("TEXT_MICRO", micro))
warmup, steps, zero = int(env.get("WARMUP", 1)), int(env.get("STEPS", 3)), int(env.get("ZERO", 2))
peak = float(env.get("PEAK_FLOPS", 989e12))
cpu = env.get("DS_ACCELERATOR") == "cpu"
if not cpu and not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible; use --dry-run-cpu to check the script without a GPU")

cfg = validate(ExperimentConfig, {
    "name": f"gpu-check-{preset}",
    "model": {"preset": preset},
    "loss": {"kind": "softmax", "block_size": block},
    "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.2, "warmup_steps": 0},
    "train": {"global_batch": batch, "micro_batch_size": micro, "text_micro_batch_size": text_micro,
              "steps": 100, "seed": 0, "precision": "bf16", "zero_stage": zero, "num_workers": 1,
              "use_gpu": not cpu},
})
stats = preset_stats(preset)
device = "cpu" if cpu else torch.cuda.get_device_name(0)
print(f"# torch {torch.__version__}, device {device}; preset {preset} ({stats.params / 1e6:.1f} M params, "
      f"{stats.macs_per_sample / 1e9:.2f} GMACs/sample forward)", flush=True)

torch.manual_seed(0)
model = create_model(preset).train()
t0 = time.perf_counter()
engine, _ = build_engine(model, cfg, world_size=1)
dtype = next(engine.module.parameters()).dtype
print(f"# engine: ZeRO-{zero_stage(engine)}, module dtype {dtype}, device {engine.device}, "
      f"built in {time.perf_counter() - t0:.1f} s", flush=True)

spec = engine.module.config
g = torch.Generator(device=engine.device).manual_seed(1)
images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g, device=engine.device,
                     dtype=dtype)
# Full-length captions: the text tower's cost does not depend on padding, and macs_per_sample
# counts a full-length caption.
tokens = torch.randint(1, spec.vocab_size, (batch, spec.context_length), generator=g, device=engine.device)
input_gb = (images.numel() * images.element_size() + tokens.numel() * tokens.element_size()) / 1e9


def sync() -> None:
    if not cpu:
        torch.cuda.synchronize()


times, metrics = [], {}
for s in range(warmup + steps):
    sync()
    t0 = time.perf_counter()
    metrics = train_step(engine, images, tokens, cfg, step=s)
    sync()
    dt = time.perf_counter() - t0
    kind = "warm-up" if s < warmup else "timed"
    print(f"step {s} ({kind}): {dt:.2f} s, loss {metrics['train/loss']:.4f}, "
          f"grad_norm {metrics['train/grad_norm']}", flush=True)
    if s >= warmup:
        times.append(dt)
    if not torch.isfinite(torch.tensor(metrics["train/loss"])):
        raise SystemExit("non-finite loss")

step_s = statistics.median(times)
mfu = utilization(training_macs(stats.macs_per_sample, batch), step_s, peak)
hfu = utilization(step_macs_with_cache(stats.macs_per_sample, batch), step_s, peak)
peak_gb = torch.cuda.max_memory_allocated() / 1e9 if not cpu else float("nan")
print(f"\n| preset | B | micro | block | zero | step s (median of {steps}) | samples/s | MFU | HFU "
      f"| peak GPU mem GB | of which inputs GB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| {preset} | {batch} | {micro} | {block} | {zero} | {step_s:.2f} | {batch / step_s:,.0f} | "
      f"{100 * mfu:.2f}% | {100 * hfu:.2f}% | {peak_gb:.1f} | {input_gb:.2f} |")
print(f"\nMFU = 2 * 3 * {stats.macs_per_sample:,} MACs * {batch} / step s / {peak:.3g} FLOP/s (PEAK_FLOPS); "
      f"HFU counts the cache's extra forward (4x). Last step's phases (host clock, not synchronised): "
      + ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items() if k.startswith("train/time/")))
PY
