"""The GPU paths of scalelab checked in one run: the Python part of benchmarks/gpu_check.sh.

Four checks, in order, each printing PASS/FAIL with its measured figure and its tolerance; the exit
status is 1 when any fails. All in bf16, on CUDA (or, with DS_ACCELERATOR=cpu, the same code on CPU,
still in bf16: what `gpu_check.sh --dry-run-cpu` runs).

1. cached vs full-batch step: `scalelab.verify.low_precision_check` (tolerance there: the cached step's
   gradient error against float64 at most twice the plain bf16 step's own);
2. RNG replay with dropout: `scalelab.verify.replay_check` (bit for bit);
3. ZeRO-2 on one device: single-process DeepSpeed engines (`train.engine.build_engine`, world size 1),
   3 cached steps each, ZeRO-2 in bf16 against ZeRO-0 in fp32 (tolerances at ZERO_TOLERANCE);
4. the big step: PRESET at global batch BATCH, micro-batch sized from memory (`train.memory`), timed.

Ray Train is not in it: the GPU machine has no Ray and no network, and Ray's wheel alone exceeds the
64 MiB a device call carries. The Ray Train path of the same engine and step (two workers, ZeRO 0-3,
against a single-process full-batch reference) is tests/train/test_engine.py's, on CPU.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scalelab.config import ExperimentConfig, validate
from scalelab.models import create_model, preset_stats
from scalelab.train.compute import step_macs_with_cache, training_macs, utilization
from scalelab.train.memory import optimizer_state_bytes, plan_micro_batch, probe_activation_memory
from scalelab.verify import low_precision_check, random_batch, replay_check

DTYPE = torch.bfloat16
# Check 3: ZeRO-2 in bf16 against ZeRO-0 in fp32 (the torch optimizer stepping the parameters: the path
# tests/train/test_engine.py proves exact against a plain full-batch step). With Adam's default eps the
# update is normalised per element (at step 1 it is lr * sign(g)), which turns rounding-level gradient
# differences on near-zero elements into full-size update differences; with eps = 1e6, far above any
# |g|, AdamW's update is lr / eps times the gradient's momentum: linear, so the updates differ as the
# gradients do. bf16 gradients differ from fp32 ones by ~1e-2 relative (check 1 measures 0.75% to 1.3% on
# tiny and pico; bf16's unit roundoff is 2^-8 = 0.39%), so 5% bounds bf16 noise; a dropped or doubled
# micro-batch, or a misplaced accumulation boundary, changes the update by tens of percent.
ZERO_OPTIM = {"name": "adamw", "lr": 10.0, "eps": 1e6, "weight_decay": 0.0, "warmup_steps": 0,
              "grad_clip": None}
# The pre-clip global gradient norm of every step is held to the same 5%: it catches a gradient off by
# a constant factor (DeepSpeed dividing by the accumulation steps: 75%), which AdamW's update hides.
ZERO_TOLERANCE = 0.05


@dataclass(frozen=True)
class Settings:
    """The knobs (environment variables; gpu_check.sh's header lists them)."""

    device: str
    preset: str
    batch: int
    micro: str  # "auto" or a number
    block: int
    zero: int
    warmup: int
    steps: int
    peak_flops: float
    memory_gb: float | None  # the memory the micro-batch is planned in (default: the GPU's)
    check_preset: str

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        cpu = env.get("DS_ACCELERATOR") == "cpu"
        return cls(
            device="cpu" if cpu else "cuda",
            preset=env.get("PRESET", "vit-b16"), batch=int(env.get("BATCH", 65536)),
            micro=env.get("MICRO", "auto"), block=int(env.get("BLOCK", 8192)), zero=int(env.get("ZERO", 2)),
            warmup=int(env.get("WARMUP", 1)), steps=int(env.get("STEPS", 2)),
            peak_flops=float(env.get("PEAK_FLOPS", 989e12)),
            memory_gb=float(env["MEMORY_GB"]) if env.get("MEMORY_GB") else None,
            check_preset=env.get("CHECK_PRESET", "tiny"),
        )


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_cached_step(s: Settings) -> Check:
    report = low_precision_check(s.check_preset, 64, 16, device=s.device, dtype=DTYPE)
    return Check("cached step vs full-batch step", report.ok, report.summary())


def check_replay(s: Settings) -> Check:
    report = replay_check(s.check_preset, 32, 8, device=s.device, dtype=DTYPE)
    return Check("RNG replay with dropout", report.ok, report.summary())


def _config(preset: str, batch: int, micro: int, *, zero: int, precision: str, s: Settings,
            block: int | None = None, optim: dict | None = None) -> ExperimentConfig:
    return validate(ExperimentConfig, {
        "name": f"gpu-check-{preset}-zero{zero}-{precision}",
        "model": {"preset": preset},
        "loss": {"kind": "softmax", "block_size": block},
        "optim": optim or {"name": "adamw", "lr": 5e-4, "weight_decay": 0.2, "warmup_steps": 0},
        "train": {"global_batch": batch, "micro_batch_size": micro, "steps": 100, "seed": 0,
                  "precision": precision, "zero_stage": zero, "num_workers": 1,
                  "use_gpu": s.device == "cuda"},
    })


def _engine_steps(cfg: ExperimentConfig, weights: dict[str, torch.Tensor], steps: int):
    """Build a one-rank engine from `weights`, take `steps` cached steps; (fp32 update, grad norms)."""
    import deepspeed

    from scalelab.train.engine import build_engine, zero_stage
    from scalelab.train.step import train_step

    model = create_model(cfg.model.preset)
    model.load_state_dict(weights)
    engine, _ = build_engine(model, cfg, world_size=1)
    assert zero_stage(engine) == cfg.train.zero_stage

    def master() -> torch.Tensor:  # ZeRO's fp32 master copy; at ZeRO-0 fp32 the parameters themselves
        params = [p for _, p in sorted(engine.module.named_parameters())]
        copies = [deepspeed.utils.safe_get_full_fp32_param(p) if cfg.train.zero_stage else p for p in params]
        return torch.cat([c.detach().double().flatten().cpu() for c in copies])

    before, norms = master(), []
    for step in range(steps):
        images, tokens = random_batch(engine.module.config, cfg.train.global_batch, seed=100 + step,
                                      device=engine.device, dtype=torch.float32)
        norms.append(train_step(engine, images, tokens, cfg, step=step)["train/grad_norm"])
    update = master() - before
    engine.destroy()
    return update, norms


def check_zero(s: Settings, steps: int = 3) -> Check:
    """ZeRO-2 in bf16 against ZeRO-0 in fp32 from the same (bf16-representable) weights."""
    torch.manual_seed(0)
    weights = {k: v.to(DTYPE).float() for k, v in create_model(s.check_preset).state_dict().items()}
    (exact, exact_norms), (zero2, norms) = (
        _engine_steps(_config(s.check_preset, 32, 8, zero=zero, precision=precision, s=s, optim=ZERO_OPTIM),
                      weights, steps)
        for zero, precision in ((0, "fp32"), (2, "bf16")))
    diff = ((zero2 - exact).norm() / exact.norm()).item()
    norm_diff = max(abs(a - b) / b for a, b in zip(norms, exact_norms))
    ok = diff <= ZERO_TOLERANCE and norm_diff <= ZERO_TOLERANCE
    return Check("ZeRO-2 (bf16) vs ZeRO-0 (fp32) on one device", ok, (
        f"{steps} steps of {s.check_preset} (B=32, 4 micro-batches, AdamW with eps 1e6: linear in the "
        f"gradient): relative difference of the fp32 parameter updates {diff:.3g} (tolerance "
        f"{ZERO_TOLERANCE:g}); pre-clip gradient norms differ by at most {norm_diff:.2g} relative "
        f"(tolerance {ZERO_TOLERANCE:g})"))


def check_big_step(s: Settings) -> Check:
    """PRESET at BATCH, micro-batch from memory, WARMUP + STEPS cached steps; prints the table."""
    from scalelab.train.engine import build_engine, zero_stage
    from scalelab.train.step import train_step

    stats = preset_stats(s.preset)
    torch.manual_seed(0)
    model = create_model(s.preset).to(s.device, DTYPE).train()
    spec = model.config
    g = torch.Generator(device=s.device).manual_seed(1)
    images = torch.randn(s.batch, 3, spec.image_size, spec.image_size, generator=g, device=s.device,
                         dtype=DTYPE)
    # Full-length captions: the text tower's cost does not depend on padding, and macs_per_sample
    # counts a full-length caption.
    tokens = torch.randint(1, spec.vocab_size, (s.batch, spec.context_length), generator=g, device=s.device)
    input_gb = (images.nbytes + tokens.nbytes) / 1e9
    micro, plan = _micro_batch(s, model, images, tokens)
    if plan is not None:
        print(f"# {plan.summary()}", flush=True)

    cfg = _config(s.preset, s.batch, micro, zero=s.zero, precision="bf16", s=s, block=s.block)
    t0 = time.perf_counter()
    engine, _ = build_engine(model, cfg, world_size=1)
    print(f"# engine: ZeRO-{zero_stage(engine)}, module dtype {next(engine.module.parameters()).dtype}, "
          f"device {engine.device}, built in {time.perf_counter() - t0:.1f} s", flush=True)
    times, metrics = [], {}
    for step in range(s.warmup + s.steps):
        _sync(s.device)
        t0 = time.perf_counter()
        metrics = train_step(engine, images, tokens, cfg, step=step)
        _sync(s.device)
        dt = time.perf_counter() - t0
        kind = "warm-up" if step < s.warmup else "timed"
        print(f"step {step} ({kind}): {dt:.2f} s, loss {metrics['train/loss']:.4f}, "
              f"grad_norm {metrics['train/grad_norm']}", flush=True)
        if step >= s.warmup:
            times.append(dt)
        if not math.isfinite(metrics["train/loss"]):
            return Check("big step", False, f"non-finite loss at step {step}")

    step_s = statistics.median(times)
    mfu = utilization(training_macs(stats.macs_per_sample, s.batch), step_s, s.peak_flops)
    hfu = utilization(step_macs_with_cache(stats.macs_per_sample, s.batch), step_s, s.peak_flops)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if s.device == "cuda" else float("nan")
    print(f"\n| preset | B | micro | block | zero | step s (median of {s.steps}) | samples/s | MFU | HFU "
          f"| peak GPU mem GB | predicted GB | of which inputs GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    predicted = f"{plan.predicted_peak_bytes / 1e9:.1f}" if plan is not None else "-"
    print(f"| {s.preset} | {s.batch} | {micro} | {s.block} | {s.zero} | {step_s:.2f} | "
          f"{s.batch / step_s:,.0f} | {100 * mfu:.2f}% | {100 * hfu:.2f}% | {peak_gb:.1f} | {predicted} | "
          f"{input_gb:.2f} |")
    print(f"\nMFU = 2 * 3 * {stats.macs_per_sample:,} MACs * {s.batch} / step s / {s.peak_flops:.3g} FLOP/s "
          f"(PEAK_FLOPS); HFU counts the cache's extra forward (4x). Last step's phases (host clock, not "
          "synchronised): " + ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items()
                                        if k.startswith("train/time/")))
    return Check("big step", True, (
        f"{s.preset} at B={s.batch}, micro-batch {micro} ({'auto' if plan else 'given'}): "
        f"{s.batch / step_s:,.0f} samples/s, MFU {100 * mfu:.2f}%, peak memory {peak_gb:.1f} GB "
        "(tolerance: finite losses, no out-of-memory)"))


def _micro_batch(s: Settings, model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    """MICRO, or the plan from a probe of 16 and 32 rows (8 and 16 on CPU) and the device's memory."""
    if s.micro != "auto":
        return int(s.micro), None
    probe = probe_activation_memory(model, images, tokens, size=16 if s.device == "cuda" else 4)
    n_params = sum(p.numel() for p in model.parameters())
    if s.device == "cuda":
        capacity = torch.cuda.mem_get_info()[1] if s.memory_gb is None else int(s.memory_gb * 1e9)
        allocated = torch.cuda.memory_allocated()
    else:  # no allocator statistics: what is resident is the inputs and the module
        if s.memory_gb is None:
            raise SystemExit("MICRO=auto on CPU needs MEMORY_GB (the memory to plan the micro-batch in)")
        capacity = int(s.memory_gb * 1e9)
        allocated = images.nbytes + tokens.nbytes + sum(p.nbytes for p in model.parameters())
    resident = allocated + optimizer_state_bytes(n_params, world_size=1)
    plan = plan_micro_batch(probe, capacity_bytes=capacity, resident_bytes=resident, limit=s.batch)
    return plan.micro_batch, plan


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    s = Settings.from_env()
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; use --dry-run-cpu to check the script without a GPU")
    where = "cpu" if s.device == "cpu" else torch.cuda.get_device_name(0)
    stats = preset_stats(s.preset)
    print(f"# torch {torch.__version__}, device {where}, {DTYPE}; checks 1-3 on {s.check_preset}, the big "
          f"step on {s.preset} ({stats.params / 1e6:.1f} M params, {stats.macs_per_sample / 1e9:.2f} "
          "GMACs/sample forward)", flush=True)
    checks: list[Callable[[Settings], Check]] = [check_cached_step, check_replay, check_zero, check_big_step]
    failed = 0
    for number, check in enumerate(checks, 1):
        t0 = time.perf_counter()
        try:
            result = check(s)
        except Exception as error:  # a check that crashes fails; the next ones still run
            traceback.print_exc()
            result = Check(check.__name__, False, f"{type(error).__name__}: {error}")
        failed += not result.ok
        print(f"{'PASS' if result.ok else 'FAIL'} [{number}/{len(checks)}] {result.name}: {result.detail} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        if s.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"{len(checks) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
