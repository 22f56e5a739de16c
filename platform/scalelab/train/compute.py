"""Compute accounting: training MACs of a run (the scaling-law axis) and MACs of a cached step.

Two different numbers, on purpose:
- `training_macs` is *model* compute, the quantity scaling-law papers (Kaplan et al., Chinchilla,
  BASIC's compute axis) put on the x-axis: forward + backward ≈ 3 × forward (the backward costs
  ≈ 2 forwards: gradients w.r.t. activations and w.r.t. weights). It does not depend on how the step
  was executed, so runs with and without a gradient cache, or with different micro-batch sizes, are
  comparable at equal compute.
- `step_macs_with_cache` is what the hardware actually does in one gradient-cache step: phase 1
  encodes every sample without autograd (1 forward), phase 3 re-encodes it with autograd and
  backpropagates (1 forward + 1 backward ≈ 3 forwards): 4 × forward. Use it for hardware
  utilisation; the extra forward is overhead of the cache, not model compute.

MACs are multiply-accumulates as counted by `scalelab.models.preset_stats` (matmul/conv only); one
MAC is two FLOPs.
"""

from __future__ import annotations

__all__ = [
    "CACHED_STEP_FORWARD_MULTIPLE",
    "TRAINING_FORWARD_MULTIPLE",
    "step_macs_with_cache",
    "training_macs",
    "utilization",
]

TRAINING_FORWARD_MULTIPLE = 3  # forward + backward (≈ 2 forwards)
CACHED_STEP_FORWARD_MULTIPLE = 4  # no-grad forward + re-forward + backward


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def training_macs(macs_per_sample: int, samples: int) -> int:
    """Model compute of training on `samples` samples: 3 × forward MACs × samples (exact integer)."""
    return TRAINING_FORWARD_MULTIPLE * _check_count("macs_per_sample", macs_per_sample) * _check_count(
        "samples", samples
    )


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
