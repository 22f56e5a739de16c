"""Errors that a restart cannot fix end a run at once; the ones it can fix are retried by Ray.

Ray Train's `FailureConfig(max_failures)` restarts the worker group from the last checkpoint after any
worker error. That is right for a killed worker, a lost node or a dead actor, and wrong for an error
that will recur: an eval folder that cannot be read, data that gives no full batch, a run whose loss
stays non-finite. Those replay the same steps deterministically and fail again, `max_failures` times.

So the worker does not raise them. All ranks agree on the stop at a point where every rank can take
part (an all-reduce after evaluation; decisions that are already identical on every rank need none),
raise `RunStopped` there, and return normally from the training function after rank 0 has written
`failure.json` into the run's folder. The driver (`launch`) reads it after `fit()`, marks the MLflow
run FAILED with the reason as the tag `scalelab.failure`, and raises `RunFailed`, which the command
line prints as one line. Checkpoints are untouched: after fixing the cause, the same command resumes
from the last good one (the driver clears `failure.json` before every attempt).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from scalelab import storage
from scalelab.storage import Location

__all__ = ["FAILURE_FILE", "Failure", "RunFailed", "RunStopped", "clear_failure", "read_failure",
           "write_failure"]

FAILURE_FILE = "failure.json"


class RunStopped(Exception):
    """Raised on every rank at the same step when the run must end without a retry (module doc)."""

    def __init__(self, reason: str, kind: str = "error") -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


class RunFailed(RuntimeError):
    """The driver's error for a run that stopped on a deterministic error; its text is one line."""


@dataclass(frozen=True)
class Failure:
    """What `failure.json` holds: why and where the run stopped."""

    reason: str
    kind: str  # "eval", "data", "non_finite", "error"
    step: int


def write_failure(run_dir: Location, failure: Failure) -> None:
    storage.write_text(storage.join(run_dir, FAILURE_FILE), json.dumps(asdict(failure)))  # written whole


def read_failure(run_dir: Location) -> Failure | None:
    path = storage.join(run_dir, FAILURE_FILE)
    if not storage.is_file(path):
        return None
    return Failure(**json.loads(storage.read_text(path)))


def clear_failure(run_dir: Location) -> None:
    storage.delete(storage.join(run_dir, FAILURE_FILE))
