"""The Tune trial function: one grid point = one `train.launch` run, nested under the sweep's parent run.

Runs inside a Tune trial actor. A re-run (resumed sweep, errored trial) calls `launch` again: Ray Train
finds the trial's checkpoints under its run name and continues; MLflow finds the child run by its
`scalelab.trial` tag.

Tune hears about the run from this function's own thread only. `launch` runs in a helper thread and
hands rank 0's progress (`train.progress`: every logging step's metrics, every evaluation) to a local
queue, which this thread reports to Tune — the last items after `launch` returned, before it returns
itself. Reports to Tune from another thread (as Ray's own `TuneReportCallback` does from the trial's
main thread) deadlock Ray Tune 2.60 when the function returns while such a report is still queued:
the function's final (implicit) report and the other one each wait for the other in the size-1 result
queue (seen in sweeps, both threads idle).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

from ray import tune

from scalelab.config import ExperimentConfig, validate
from scalelab.train.launch import TrainResult, launch

__all__ = ["run_trial"]

TRIAL_TAG = "scalelab.trial"


def run_trial(config: dict[str, Any], *, experiments: dict[str, dict[str, Any]],
              axes: dict[str, tuple[int, str, int]], sweep_name: str, parent_run_id: str) -> None:
    name = config["trial"]
    cfg = validate(ExperimentConfig, experiments[name])
    data, model, batch = axes[name]
    tags = {"sweep": sweep_name, "trial": name, "trial_id": tune.get_context().get_trial_id(),
            "axis.data": str(data), "axis.model": model, "axis.batch": str(batch)}
    progress: queue.Queue[dict[str, Any]] = queue.Queue()
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def train() -> None:
        try:
            outcome["result"] = launch(cfg, parent_run_id=parent_run_id, tags=tags,
                                       run_key=(TRIAL_TAG, f"{sweep_name}/{name}"), verbose=False,
                                       progress=progress.put)
        except BaseException as err:  # re-raised in this thread: Tune records the trial's error
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=train, name=f"launch-{name}", daemon=True).start()
    # `launch` hands over every item before it returns: drained after `done`, none is lost.
    while not (done.is_set() and progress.empty()):
        with contextlib.suppress(queue.Empty):
            tune.report(_newest(progress, progress.get(timeout=0.5)))
    if "error" in outcome:
        raise outcome["error"]
    _report_if_untrained(outcome["result"])


def _newest(progress: queue.Queue[dict[str, Any]], first: dict[str, Any]) -> dict[str, Any]:
    """`first` and every item queued after it, as one report: the newest value of each key. Each report
    is work for Tune's driver (its callbacks, the trial's result files) on the cores the trials train
    on; MLflow holds every step, Tune needs the newest (the live view, the trial's final metric)."""
    merged = dict(first)
    with contextlib.suppress(queue.Empty):
        while True:
            merged.update(progress.get_nowait())
    return merged


def _report_if_untrained(result: TrainResult) -> None:
    """A finished trial run again trains nothing, so Train reports nothing: its final numbers."""
    if result.resumed_from is not None and result.step <= result.resumed_from:
        tune.report({**result.final_metrics, "step": result.step, "train/samples_seen": result.samples_seen,
                     "mlflow_run_id": result.mlflow_run_id})
