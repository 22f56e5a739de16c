"""The Tune trial function: one grid point = one `train.launch` run, nested under the sweep's parent run.

Runs inside a Tune trial actor. The Train run's own reports are forwarded to Tune by
`TuneReportCallback` (the live table's samples seen, loss and, in the last one, the end-of-run
metrics). A re-run (resumed sweep, errored trial) calls `launch` again: Ray Train finds the trial's
checkpoints under its run name and continues; MLflow finds the child run by its `scalelab.trial` tag.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from scalelab.config import ExperimentConfig, validate
from scalelab.train.launch import launch

__all__ = ["run_trial"]

TRIAL_TAG = "scalelab.trial"


def run_trial(config: dict[str, Any], *, experiments: dict[str, dict[str, Any]],
              axes: dict[str, tuple[int, str, int]], sweep_name: str, parent_run_id: str) -> None:
    name = config["trial"]
    cfg = validate(ExperimentConfig, experiments[name])
    data, model, batch = axes[name]
    tags = {"sweep": sweep_name, "trial": name, "trial_id": tune.get_context().get_trial_id(),
            "axis.data": str(data), "axis.model": model, "axis.batch": str(batch)}
    result = launch(cfg, parent_run_id=parent_run_id, tags=tags, run_key=(TRIAL_TAG, f"{sweep_name}/{name}"),
                    verbose=False, callbacks=[TuneReportCallback()])
    # Report here only when launch() trained nothing (a finished trial run again): otherwise the Train
    # reports forwarded by TuneReportCallback already carry samples, loss and the final metrics, and a
    # report from this thread can deadlock Ray Tune 2.60. The trial's main thread, the only reader of
    # the result queue, hands a forwarded report to that queue itself and blocks there for good when
    # this thread's report got in first (seen in a sweep: both threads waiting in Queue.put, load 0).
    if result.resumed_from is not None and result.step <= result.resumed_from:
        tune.report({**result.final_metrics, "step": result.step, "train/samples_seen": result.samples_seen,
                     "mlflow_run_id": result.mlflow_run_id})
