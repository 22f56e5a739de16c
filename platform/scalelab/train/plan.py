"""What the driver hands every training worker: one typed plan, built once, a dict only across Ray.

`launch` decides everything a worker must not decide on its own — the MLflow run, the checkpoint to
start from (`resume.decide_resume`), the model's MACs per sample for compute accounting — and ships it
as `WorkerPlan.to_dict()` (Ray pickles the train-loop config; a plain dict keeps the wire format
independent of class versions). The worker's first line is `WorkerPlan.from_dict(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scalelab import storage
from scalelab.config import ExperimentConfig, validate
from scalelab.storage import Location

__all__ = ["PROGRESS_KEY", "WorkerPlan"]

# The train-loop config's entry beside the plan: rank 0's channel to the driver (`train.progress.Sender`).
PROGRESS_KEY = "progress"


@dataclass(frozen=True)
class WorkerPlan:
    """A training run as its workers see it."""

    experiment: ExperimentConfig
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    macs_per_sample: int = 0
    resume_from: str | None = None  # the checkpoint the driver chose (None: a fresh start)

    @property
    def run_dir(self) -> Location:
        """`<run.storage>/<name>`: checkpoints and `failure.json` (every node sees the storage root)."""
        return storage.join(self.experiment.run.storage, self.experiment.name)

    @property
    def steps(self) -> int:
        return self.experiment.train.steps

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment.to_dict(), "mlflow_run_id": self.mlflow_run_id,
                "tracking_uri": self.tracking_uri, "macs_per_sample": int(self.macs_per_sample),
                "resume_from": self.resume_from}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerPlan:
        return cls(experiment=validate(ExperimentConfig, data["experiment"]),
                   mlflow_run_id=data.get("mlflow_run_id"), tracking_uri=data.get("tracking_uri"),
                   macs_per_sample=int(data.get("macs_per_sample", 0)), resume_from=data.get("resume_from"))
