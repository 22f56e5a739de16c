"""Sizing the gradient-cache micro-batch from the accelerator's memory.

Phase 3 of the cached step (`scalelab.gradcache`) re-encodes one micro-batch of each tower with autograd
and backpropagates it; its activations are what grows with the micro-batch. What stays resident through
the step does not: the global batch's inputs, the module, ZeRO's fp32 master copy and optimizer state.
So the micro-batch is sized in three steps:

1. `probe_activation_memory`: one forward + backward of two small probe micro-batches (n and 2n rows
   of both towers, as one replay call holds them), measured on CUDA as the allocator's peak above what
   was allocated before (`torch.cuda.max_memory_allocated`);
2. `ActivationProbe.per_sample_bytes` / `fixed_bytes`: a line through the two peaks: the slope is the
   activation memory of one sample, the intercept what a backward costs whatever the batch (weight
   gradients, workspaces);
3. `plan_micro_batch`: the largest power of two, at most the per-rank batch, whose line fits in the
   device's memory less a headroom fraction and less what is resident now.

Steps 2 and 3 are pure arithmetic (tested on CPU; no torch import, so sweep configs size micro-batches
with `largest_micro_batch` without loading torch). On CPU, where there are no allocator statistics, the
probe counts the bytes autograd saves for backward instead (as `models.activation_bytes_per_sample`
does on the meta device): the same line, without workspaces. The loss phase (O(B · block) for the tiled
loss) runs while no activations are alive, so it does not compete with the micro-batch for memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the probe only: the arithmetic is for torch-free callers too
    from torch import Tensor, nn

__all__ = ["ActivationProbe", "MicroBatchPlan", "largest_micro_batch", "optimizer_state_bytes",
           "plan_micro_batch", "probe_activation_memory"]

# Of the device's memory, kept free: the CUDA context (outside torch's allocator), fragmentation, and
# ZeRO's gradient buckets and fp32 gradient partitions, which appear only at the first real step.
DEFAULT_HEADROOM = 0.10


@dataclass(frozen=True)
class ActivationProbe:
    """Peak bytes above the resident baseline of one forward + backward at two probe sizes."""

    sizes: tuple[int, int]
    peaks: tuple[int, int]

    @property
    def per_sample_bytes(self) -> float:
        """The slope: activation bytes one more sample adds (at least one byte)."""
        (n1, n2), (p1, p2) = self.sizes, self.peaks
        if n2 <= n1:
            raise ValueError(f"probe sizes must increase, got {self.sizes}")
        return max(1.0, (p2 - p1) / (n2 - n1))

    @property
    def fixed_bytes(self) -> float:
        """The intercept: what a backward costs at any micro-batch (never below zero)."""
        return max(0.0, self.peaks[0] - self.sizes[0] * self.per_sample_bytes)


@dataclass(frozen=True)
class MicroBatchPlan:
    """The micro-batch chosen and the figures it was chosen from (bytes)."""

    micro_batch: int
    capacity_bytes: int  # the device's memory
    resident_bytes: int  # allocated before the step: inputs, module, master copy, optimizer state
    fixed_bytes: float  # the probe's intercept
    per_sample_bytes: float  # the probe's slope
    headroom: float

    @property
    def budget_bytes(self) -> float:
        """What the micro-batch's activations may use."""
        return self.capacity_bytes * (1.0 - self.headroom) - self.resident_bytes - self.fixed_bytes

    @property
    def predicted_peak_bytes(self) -> float:
        """The peak the plan expects while a micro-batch is replayed."""
        return self.resident_bytes + self.fixed_bytes + self.micro_batch * self.per_sample_bytes

    def summary(self) -> str:
        gb = 1e9
        return (f"micro-batch {self.micro_batch}: {self.per_sample_bytes / 2**20:.2f} MiB of activations "
                f"per sample (probe), {self.budget_bytes / gb:.2f} GB for them of "
                f"{self.capacity_bytes / gb:.2f} GB ({self.resident_bytes / gb:.2f} GB resident, "
                f"{self.headroom:.0%} headroom); "
                f"predicted peak {self.predicted_peak_bytes / gb:.2f} GB")


def largest_micro_batch(budget_bytes: float, per_sample_bytes: float, *, limit: int) -> int:
    """The largest power of two whose `per_sample_bytes` each fit in `budget_bytes`, capped at `limit`
    (the per-rank batch, which need not be a power of two); at least 1."""
    if per_sample_bytes <= 0:
        raise ValueError(f"per_sample_bytes must be positive, got {per_sample_bytes}")
    if limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    fits = max(1, math.floor(budget_bytes / per_sample_bytes))
    return min(limit, 1 << (fits.bit_length() - 1))


def optimizer_state_bytes(n_params: int, *, world_size: int) -> float:
    """Bytes per rank a bf16 ZeRO-1/2 engine adds to the module with AdamW: an fp32 master copy, two fp32
    moments and an fp32 gradient partition (16 bytes a parameter), each split over the ranks. An upper
    bound for the other optimizers (Lion keeps one moment, Adafactor factored ones) and for ZeRO-0; the
    micro-batch is planned before the engine exists (DeepSpeed's config needs the micro-batch count)."""
    return 16.0 * n_params / world_size


def plan_micro_batch(
    probe: ActivationProbe,
    *,
    capacity_bytes: int,
    resident_bytes: int,
    limit: int,
    headroom: float = DEFAULT_HEADROOM,
) -> MicroBatchPlan:
    """The micro-batch for a device of `capacity_bytes` with `resident_bytes` already allocated."""
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    plan = MicroBatchPlan(0, capacity_bytes, resident_bytes, probe.fixed_bytes, probe.per_sample_bytes,
                          headroom)
    micro = largest_micro_batch(plan.budget_bytes, probe.per_sample_bytes, limit=limit)
    return dataclasses.replace(plan, micro_batch=micro)


def probe_activation_memory(model: nn.Module, images: Tensor, tokens: Tensor, size: int) -> ActivationProbe:
    """Measure one forward + backward of `size` and `2 * size` rows of both towers (module docstring).

    Gradients are taken with `torch.autograd.grad`, which returns them instead of accumulating into
    `.grad`: the model is left as it was (benchmarks/gpu_check.py probes before building the engine,
    whose DeepSpeed config needs the micro-batch).
    """
    if images.shape[0] < 2 * size:
        raise ValueError(f"the probe needs {2 * size} rows, the batch has {images.shape[0]}")
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = (size, 2 * size)
    return ActivationProbe(sizes, tuple(_peak_of_backward(model, images[:n], tokens[:n], params)
                                        for n in sizes))


def _peak_of_backward(model: nn.Module, images: Tensor, tokens: Tensor, params: list[Tensor]) -> int:
    import torch

    def surrogate() -> Tensor:
        return model.encode_image(images).float().sum() + model.encode_text(tokens).float().sum()

    if images.device.type != "cuda":
        saved = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.autograd.grad(surrogate(), params, allow_unused=True)
        return saved
    device = images.device
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.enable_grad():
        grads = torch.autograd.grad(surrogate(), params, allow_unused=True)
    del grads
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
