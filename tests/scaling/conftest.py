"""A synthetic 2×2×2 sweep with a known multiplicative power law in each axis."""

import itertools

import pytest

from scalelab.scaling import TrialResult

METRIC = "eval/zeroshot/test/top1"
PRESETS = {"tiny": 1_000_000, "small": 8_000_000}


def make_grid(datas=(100_000, 1_000_000), models=("tiny", "small"), batches=(256, 1024)) -> list[TrialResult]:
    results = []
    for i, (d, m, b) in enumerate(itertools.product(datas, models, batches)):
        params = PRESETS[m]
        samples = 2 * d
        err = 4.0 * d**-0.1 * params**-0.05 * b**-0.02
        results.append(TrialResult(
            trial_id=f"t{i:03d}", data=d, model=m, batch=b, params=params, macs_per_sample=2 * params,
            samples_seen=samples, compute=4.0 * 2 * params * samples, wall_s=10.0 + i,
            metrics={METRIC: 1.0 - err, "train/loss": 3.0 - i * 0.1},
            extra={"lr": 1e-3, "tag": f"x{i}"},
            curve=[(s, 5.0 / (1 + s / 1000)) for s in (256, 1024, 4096, samples)],
        ))
    return results


@pytest.fixture
def grid() -> list[TrialResult]:
    return make_grid()
