"""Whether a run starts fresh, resumes, is already finished, or must be refused — decided once.

`decide_resume(cfg)` reads the run's folder on storage (no Ray, no torch) and is the only place that
answers the question: preflight calls it to refuse an incompatible re-run before anything starts,
`launch` calls it to choose what to do and tells the workers which checkpoint to load
(`WorkerPlan.resume_from`). The one thing the driver cannot know is a restart Ray makes inside one
`fit()` after a worker failure; Ray hands that worker group the checkpoint it recorded, which is newer
than the driver's choice by construction (`loop.starting_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from scalelab import storage
from scalelab.config import ConfigError, ExperimentConfig, flatten, validate
from scalelab.storage import Location
from scalelab.train.checkpoint import RunState, latest_checkpoint, read_run_state, world_size_error

__all__ = ["RESUMABLE_CHANGES", "Resume", "decide_resume", "run_dir"]

# Fields a re-run may change and still continue the same run: they do not change what was trained so
# far. `train.steps` extends (or shortens) the run; the cosine schedule follows the new length. Not the
# CPU / thread counts: the number of torch threads changes floating-point reduction order, and a
# resumed run must continue bit for bit as the uninterrupted one would have.
RESUMABLE_CHANGES = ("name", "run.", "eval.", "classify.eval_sets", "train.steps", "train.max_skipped_steps",
                     "data.decode_tasks", "data.decode_cpus", "data.cache")


def run_dir(cfg: ExperimentConfig) -> Location:
    """Where Ray Train keeps this run's checkpoints: `<run.storage>/<name>` (a Path, or a URI when the
    storage is one: `storage.py`)."""
    return storage.join(cfg.run.storage, cfg.name)


@dataclass(frozen=True)
class Resume:
    """The decision: `fresh` (no checkpoint), `resume` from `checkpoint`, or `finished` (nothing to do)."""

    kind: Literal["fresh", "resume", "finished"]
    checkpoint: Location | None = None
    state: RunState | None = None

    def describe(self, steps: int) -> str:
        if self.kind == "fresh" or self.state is None:
            return "a new run"
        what = "finished" if self.kind == "finished" else "interrupted"
        return f"the {what} run at step {self.state.step}/{steps} from {storage.describe(self.checkpoint)}"


def decide_resume(cfg: ExperimentConfig) -> Resume:
    """The decision for `cfg` (absolute paths); ConfigError when the existing run cannot be continued.

    A re-run must keep the worker count (ZeRO partitions) and everything that shaped training so far;
    only `RESUMABLE_CHANGES` may differ. The message lists the differing fields.
    """
    latest = latest_checkpoint(run_dir(cfg))
    if latest is None:
        return Resume("fresh")
    state = read_run_state(latest)
    if state.world_size != cfg.train.num_workers:
        raise ConfigError(world_size_error(latest, state.world_size, cfg.train.num_workers))
    old, new = flatten(_with_defaults(state.config)), flatten(cfg.to_dict())
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(
            f"run {cfg.name!r} exists at {storage.describe(run_dir(cfg))} with a different config "
            f"({diffs}). Resuming would mix two experiments: choose another name, or restore the old values."
        )
    return Resume("finished" if state.step >= cfg.train.steps else "resume", latest, state)


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the fields added since it was written at their defaults (a new field
    at its default changes nothing that was trained); as written when it no longer validates."""
    try:
        return validate(ExperimentConfig, config).to_dict()
    except ConfigError:
        return config
