"""Micro-batch sizing from memory: the arithmetic, and the probe on CPU (saved-tensor bytes)."""

import pytest
import torch

from scalelab.models import create_model
from scalelab.train.memory import (
    ActivationProbe,
    largest_micro_batch,
    optimizer_state_bytes,
    plan_micro_batch,
    probe_activation_memory,
)

MB = 2**20


@pytest.mark.parametrize(("budget", "per_sample", "limit", "want"), [
    (100 * MB, 1 * MB, 65536, 64),      # 100 fit: the largest power of two is 64
    (128 * MB, 1 * MB, 65536, 128),     # exactly 128 fit
    (128 * MB - 1, 1 * MB, 65536, 64),  # one byte short of 128
    (100 * MB, 1 * MB, 48, 48),         # capped at the per-rank batch, which need not be a power of two
    (0.5 * MB, 1 * MB, 64, 1),          # nothing fits: at least one row (the step will tell)
    (-5.0, 1 * MB, 64, 1),
])
def test_largest_micro_batch(budget, per_sample, limit, want):
    assert largest_micro_batch(budget, per_sample, limit=limit) == want


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"budget_bytes": 1.0, "per_sample_bytes": 0.0, "limit": 4}, "per_sample_bytes must be positive"),
    ({"budget_bytes": 1.0, "per_sample_bytes": 1.0, "limit": 0}, "limit must be a positive integer"),
])
def test_largest_micro_batch_refuses_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        largest_micro_batch(**kwargs)


def test_probe_line_through_two_peaks():
    probe = ActivationProbe(sizes=(16, 32), peaks=(1000 + 16 * 300, 1000 + 32 * 300))
    assert probe.per_sample_bytes == 300 and probe.fixed_bytes == 1000
    noisy = ActivationProbe(sizes=(16, 32), peaks=(5000, 4000))  # a shrinking peak: clamp, never negative
    assert noisy.per_sample_bytes == 1.0 and noisy.fixed_bytes == 5000 - 16
    with pytest.raises(ValueError, match="probe sizes must increase"):
        _ = ActivationProbe(sizes=(32, 16), peaks=(1, 2)).per_sample_bytes


def test_plan_on_an_h200_sized_device():
    """vit-b16-like figures: 60 MB a sample, 2 GB fixed; 143.8 GB device, 19.7 GB inputs resident."""
    gb = 10**9
    probe = ActivationProbe(sizes=(16, 32), peaks=(2 * gb + 16 * 60 * 10**6, 2 * gb + 32 * 60 * 10**6))
    resident = int(19.7 * gb + 0.3 * gb + optimizer_state_bytes(150_000_000, world_size=1))
    plan = plan_micro_batch(probe, capacity_bytes=int(143.8 * gb), resident_bytes=resident, limit=65536)
    # budget = 0.9 x 143.8 - 22.4 - 2 = 105.0 GB -> 1750 samples -> 1024
    assert plan.budget_bytes == pytest.approx(105.02 * gb, rel=1e-3)
    assert plan.micro_batch == 1024
    assert plan.predicted_peak_bytes == pytest.approx(resident + 2 * gb + 1024 * 60 * 10**6)
    assert plan.predicted_peak_bytes < 0.9 * 143.8 * gb
    assert "micro-batch 1024" in plan.summary()
    with pytest.raises(ValueError, match="headroom"):
        plan_micro_batch(probe, capacity_bytes=1, resident_bytes=0, limit=4, headroom=1.0)


def test_optimizer_state_is_split_over_ranks():
    assert optimizer_state_bytes(1000, world_size=1) == 16000
    assert optimizer_state_bytes(1000, world_size=4) == 4000


def test_cpu_probe_grows_with_the_batch_and_leaves_no_gradient():
    torch.manual_seed(0)
    model = create_model("pico").train()
    spec = model.config
    images = torch.randn(8, 3, spec.image_size, spec.image_size)
    tokens = torch.randint(1, spec.vocab_size, (8, spec.context_length))
    probe = probe_activation_memory(model, images, tokens, size=2)
    assert probe.sizes == (2, 4) and probe.peaks[1] > probe.peaks[0] > 0
    assert probe.per_sample_bytes > 1.0
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: nothing accumulated
    with pytest.raises(ValueError, match="the probe needs 16 rows"):
        probe_activation_memory(model, images, tokens, size=8)
