"""Compute accounting of `scalelab sweep --status`: spent vs planned MACs per trial, from sweep.json."""

from scalelab.scaling import TrialResult
from scalelab.sweep.results import SweepState, compute_accounts


def _result(name: str, batch: int, seen: int, macs: int) -> TrialResult:
    return TrialResult(trial_id=name, data=100, model="nano", batch=batch, extra={}, params=10,
                       macs_per_sample=macs, samples_seen=seen, compute=4.0 * macs * seen, wall_s=1.0,
                       metrics={}, state="RUNNING", curve=[])


def _state(trials: list[dict]) -> SweepState:
    return SweepState("s", "sqlite://", "1", "p", "m", None, None, trials)


def test_spent_and_planned_compute_per_trial():
    planned = [{"name": "a", "batch": 8, "steps": 10, "macs_per_sample": 3},
               {"name": "b", "batch": 16, "steps": 10, "macs_per_sample": 5}]
    results = [_result("a", 8, 40, 3), _result("b", 16, 0, 0)]  # b not started: no MLflow run yet
    assert compute_accounts(_state(planned), results) == [(4.0 * 3 * 40, 4.0 * 3 * 8 * 10),
                                                          (0.0, 4.0 * 5 * 16 * 10)]


def test_a_sweep_json_without_steps_has_no_planned_figure():
    planned = [{"name": "a", "batch": 8}]
    assert compute_accounts(_state(planned), [_result("a", 8, 40, 3)]) == [(4.0 * 3 * 40, None)]
