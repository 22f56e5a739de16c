"""Compute accounting: the MACs a run executed (scalelab's scaling axis) and its model compute.

Two different numbers, on purpose:
- `executed_macs` is what training really ran, and what a sweep's compute axis, its `compute` budget
  and `scalelab sweep --status` count (the convention `COMPUTE_CONVENTION` states): every scalelab
  step is a gradient-cache step, and a cached step encodes every sample twice — phase 1 without
  autograd (1 forward), phase 3 again with autograd and its backward (1 forward + 1 backward ≈ 3
  forwards) — so 4 × forward MACs per sample, 4/3 of a plain step's work. Evaluation is not counted.
- A supervised step (`task: classify`, train/classify.py) is a plain forward + backward: it executes
  3 × forward MACs per sample, and its MACs per sample are the image tower's (+ head) alone
  (`launch._macs_per_sample`); `executed_macs(..., task="classify")` counts it so.
- `training_macs` is *model* compute, the quantity scaling-law papers (Kaplan et al., Chinchilla,
  BASIC's compute axis) put on the x-axis: forward + backward ≈ 3 × forward. It does not depend on how
  the step was executed; compare with published laws on it (metric `train/compute_macs`), and divide
  scalelab's executed compute by 4/3 to get it.

MACs are multiply-accumulates as counted by `scalelab.models.preset_stats` (matmul/conv only); one
MAC is two FLOPs.
"""

from __future__ import annotations

__all__ = [
    "CACHED_STEP_FORWARD_MULTIPLE",
    "COMPUTE_CONVENTION",
    "TRAINING_FORWARD_MULTIPLE",
    "executed_macs",
    "step_macs_with_cache",
    "training_macs",
    "utilization",
]

TRAINING_FORWARD_MULTIPLE = 3  # forward + backward (≈ 2 forwards)
CACHED_STEP_FORWARD_MULTIPLE = 4  # no-grad forward + re-forward + backward
COMPUTE_CONVENTION = ("MACs executed in training: 4 x forward MACs per sample (the gradient cache's "
                      "no-grad forward + re-forward + backward, 4/3 of a plain step); evaluation excluded")


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def training_macs(macs_per_sample: int, samples: int) -> int:
    """Model compute of training on `samples` samples: 3 × forward MACs × samples (exact integer)."""
    return TRAINING_FORWARD_MULTIPLE * _check_count("macs_per_sample", macs_per_sample) * _check_count(
        "samples", samples
    )


def executed_macs(macs_per_sample: int, samples: int, task: str = "contrastive") -> int:
    """MACs training executed on `samples` samples: 4 × forward MACs × samples through the cached step
    (task contrastive), 3 × through a plain step (task classify)."""
    if task == "classify":
        return training_macs(macs_per_sample, samples)
    return step_macs_with_cache(macs_per_sample, samples)


def step_macs_with_cache(macs_per_sample: int, batch: int) -> int:
    """MACs the hardware executes for one gradient-cache step over `batch` samples (all ranks together
    for the global batch, or one rank's rows for a per-rank figure): 4 × forward MACs × batch.

    The loss (B×B similarity matrix) is not included: it is O(B² · embed_dim), small next to the
    towers at the batch sizes used, and not part of `macs_per_sample`.
    """
    return CACHED_STEP_FORWARD_MULTIPLE * _check_count("macs_per_sample", macs_per_sample) * _check_count(
        "batch", batch
    )


def utilization(macs: int, seconds: float, peak_flops_per_s: float) -> float:
    """Achieved fraction of peak: 2 · macs / (seconds · peak FLOP/s).

    With `training_macs` this is model FLOPs utilisation (MFU); with `step_macs_with_cache` it is
    hardware FLOPs utilisation (counts the cache's extra forward).
    """
    _check_count("macs", macs)
    if not seconds > 0 or not peak_flops_per_s > 0:
        raise ValueError(f"seconds and peak_flops_per_s must be > 0, got {seconds!r}, {peak_flops_per_s!r}")
    return 2.0 * macs / (seconds * peak_flops_per_s)
