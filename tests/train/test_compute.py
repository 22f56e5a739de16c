"""Compute accounting formulas on small numbers."""

import pytest

from scalelab.train.compute import executed_macs, step_macs_with_cache, training_macs, utilization


def test_training_macs_is_three_forwards():
    assert training_macs(5, 7) == 105
    assert training_macs(0, 7) == 0
    big = training_macs(486 * 10**9, 13 * 10**9)  # basic-l scale stays an exact integer
    assert big == 3 * 486 * 13 * 10**18 and isinstance(big, int)


def test_cached_step_is_four_forwards():
    assert step_macs_with_cache(5, 7) == 140
    assert step_macs_with_cache(5, 7) * 3 == training_macs(5, 7) * 4


def test_executed_compute_counts_the_cached_steps_extra_forward():
    assert executed_macs(5, 7) == 140 and executed_macs(5, 7) * 3 == training_macs(5, 7) * 4


def test_utilization():
    assert utilization(50, 2.0, 100.0) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_refuses_non_counts(bad):
    with pytest.raises(ValueError):
        training_macs(bad, 1)
    with pytest.raises(ValueError):
        step_macs_with_cache(1, bad)


def test_one_compute_convention_for_training_and_the_scaling_plots():
    from scalelab.scaling import table
    from scalelab.train import compute

    assert table.COMPUTE_CONVENTION == compute.COMPUTE_CONVENTION  # scaling may not import train
    assert compute.CACHED_STEP_FORWARD_MULTIPLE == 4 and "4" in table.COMPUTE_AXIS_LABEL
