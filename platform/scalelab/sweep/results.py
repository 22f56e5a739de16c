"""A sweep's state on disk and its per-trial results, read back from MLflow (the source of truth).

`<storage>/<sweep>/sweep.json` records what the driver planned — the grid (trial names and axis
values), the tracking URI, the MLflow experiment, the parent run id, the metrics — so `--status` and
`scalelab plot SWEEP_DIR` work offline and a re-run finds its parent run. The results of the trials
come from their child runs (tags `sweep`, `trial`, `axis.*`; params `model.params`,
`model.macs_per_sample`; metric histories), never from Tune's own bookkeeping, which restarts
`training_iteration` on resume.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from scalelab import storage
from scalelab.scaling import TrialResult
from scalelab.storage import Location
from scalelab.train.compute import executed_macs

__all__ = ["SweepState", "collect_results", "compute_accounts", "read_state", "state_path", "write_state"]

STATE_NAME = "sweep.json"
# finished runs' loss curves by (run id, end time), kept by a caller between `collect_results` calls
Curves = dict[tuple[str, int], list[tuple[int, float]]]
MLFLOW_TO_TUNE_STATE = {"FINISHED": "TERMINATED", "FAILED": "ERROR", "KILLED": "ERROR",
                        "RUNNING": "RUNNING", "SCHEDULED": "PENDING"}


@dataclass
class SweepState:
    """What `sweep.json` holds."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    robustness_metric: str | None
    predict_compute: float | None
    # name, data, model, batch, extra, steps, macs_per_sample (the last two since compute accounting)
    trials: list[dict[str, Any]] = field(default_factory=list)
    holdout: int | float | None = None  # which trials the fits' held-out check leaves out (SweepConfig)


def state_path(sweep_dir: Location) -> Location:
    """`<sweep_dir>/sweep.json`: a Path, or a URI when the storage is one (`storage.py`)."""
    return storage.join(sweep_dir, STATE_NAME)


def write_state(sweep_dir: Location, state: SweepState) -> None:
    # written whole: a killed driver never leaves half a state file
    storage.write_text(state_path(sweep_dir), json.dumps(asdict(state), indent=1))


def read_state(sweep_dir: Location) -> SweepState:
    path = state_path(sweep_dir)
    if not storage.is_file(path):
        raise FileNotFoundError(
            f"{storage.describe(sweep_dir)} is not a sweep folder (no {STATE_NAME}); "
            "run `scalelab sweep` first"
        )
    return SweepState(**json.loads(storage.read_text(path)))


def collect_results(state: SweepState, curves: Curves | None = None) -> list[TrialResult]:
    """One TrialResult per planned trial: finished, running, failed or not started (PENDING).

    `curves`: a cache the caller keeps between calls (the refit after each trial): the loss curve of a
    finished run, keyed by run id and end time, is read from MLflow once — reading every trial's history
    again made the refit's cost grow with the trials done. A run resumed and finished again has a new end
    time, so its new curve is read."""
    import mlflow

    client = mlflow.MlflowClient(state.tracking_uri)
    runs = client.search_runs([state.experiment_id], f"tags.sweep = '{state.name}'", max_results=10_000)
    by_trial = {r.data.tags.get("trial"): r for r in runs}
    return [_result(client, planned, by_trial.get(planned["name"]), curves) for planned in state.trials]


def _result(client: Any, planned: dict[str, Any], run: Any, curves: Curves | None) -> TrialResult:
    base = {"trial_id": planned["name"], "data": int(planned["data"]), "model": planned["model"],
            "batch": int(planned["batch"]), "extra": dict(planned.get("extra") or {})}
    if run is None:
        return TrialResult(**base, params=0, macs_per_sample=0, samples_seen=0, compute=0.0, wall_s=0.0,
                           metrics={}, state="PENDING", curve=[])
    params = run.data.params
    macs = int(params.get("model.macs_per_sample", 0))
    metrics = dict(run.data.metrics)
    seen = int(metrics.get("train/samples_seen", 0))
    end = run.info.end_time or run.info.start_time
    return TrialResult(
        **base, params=int(params.get("model.params", 0)), macs_per_sample=macs, samples_seen=seen,
        compute=float(executed_macs(macs, seen)), wall_s=max(0.0, (end - run.info.start_time) / 1000.0),
        metrics=metrics, state=MLFLOW_TO_TUNE_STATE.get(run.info.status, run.info.status),
        curve=_curve(client, run, base["batch"], curves),
    )


def _curve(client: Any, run: Any, batch: int, curves: Curves | None) -> list[tuple[int, float]]:
    """(samples seen, train loss) of every logged step, sorted; from `curves` for a finished run."""
    key = (run.info.run_id, run.info.end_time or 0)
    done = curves is not None and run.info.status == "FINISHED"
    if done and key in curves:
        return list(curves[key])
    curve = sorted({(int(m.step) * batch, float(m.value))
                    for m in client.get_metric_history(run.info.run_id, "train/loss")})
    if done:
        curves[key] = curve
    return curve


def compute_accounts(state: SweepState, results: list[TrialResult]) -> list[tuple[float, float | None]]:
    """Per trial (in `state.trials` order): (MACs executed so far, MACs its whole budget executes), both
    by `train.compute.COMPUTE_CONVENTION`; the planned figure is None for a sweep.json written before
    scalelab recorded each trial's steps."""
    out = []
    for planned, r in zip(state.trials, results):
        macs = int(planned.get("macs_per_sample") or r.macs_per_sample)
        steps = planned.get("steps")
        total = None if steps is None or not macs else float(executed_macs(macs, int(steps) * r.batch))
        out.append((r.compute, total))
    return out
