"""The self-checks of scalelab.verify: the float64 check behind `scalelab check`, and the bf16 checks of
benchmarks/gpu_check.sh, on CPU here and on CUDA where a GPU is present (`gpu` marker)."""

import pytest
import torch

import scalelab.verify as verify
from scalelab.verify import low_precision_check, replay_check, verify_cached_step

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def test_float64_check_is_exact():
    report = verify_cached_step(preset="pico", batch=12, micro_batch_size=5)
    assert report.ok, report.summary()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_cached_step_is_within_twice_the_plain_steps_error(device):
    report = low_precision_check("pico", 32, 8, device=device)
    assert report.ok, report.summary()
    assert 1e-4 < report.plain_err <= report.ceiling  # bf16 really ran: an error of bf16's size


@pytest.mark.parametrize("device", DEVICES)
def test_rng_replay_with_dropout_is_bit_exact(device):
    report = replay_check("pico", 16, 4, device=device)
    assert report.dropout_draws and report.rng_as_one_forward, report.summary()
    assert report.replay_max_abs_diff == 0.0, report.summary()


def test_bf16_check_catches_a_dropped_micro_batch(monkeypatch):
    """The tolerance means something: one backward call of four skipped fails it by far."""
    cached_step = verify.cached_step

    def dropping(*args, **kwargs):
        calls = []

        def backward(loss):
            calls.append(loss)
            if len(calls) > 1:
                loss.backward()

        return cached_step(*args, backward=backward, **kwargs)

    monkeypatch.setattr(verify, "cached_step", dropping)
    report = low_precision_check("pico", 32, 8)
    assert not report.ok and report.cached_err > 5 * report.factor * report.plain_err, report.summary()


def test_random_batch_is_the_same_on_every_dtype():
    spec = verify.create_model("pico").config
    images, tokens = verify.random_batch(spec, 6, seed=3)
    low, low_tokens = verify.random_batch(spec, 6, seed=3, dtype=torch.bfloat16)
    assert images.dtype == torch.float64 and low.dtype == torch.bfloat16
    assert images.shape == (6, 3, spec.image_size, spec.image_size)
    assert torch.equal(low, images.to(torch.bfloat16)) and torch.equal(low_tokens, tokens)
    assert (tokens[:, 0] > 0).all() and (tokens == 0).any()  # every caption has a token; some are padded
