"""launch's `TorchTrainer`: Ray Train less the helper processes it starts per fit that a run here does
not need, and what replaces the one that guarded something.

Every `fit()` starts Python processes beside the training workers: the controller, a synchronisation
actor, a Ray Data actor (even for a trainer given no datasets) and a detached placement-group cleaner.
Each one costs a Python + Ray start (1.2–1.7 s of CPU) on the cores the workers' own start needs — on 2
cores that is a visible part of a sweep trial's fixed cost (BENCHMARKS.md, *Fixed cost of a sweep
trial*). Two of them are left out:

- the Ray Data actor, when the trainer has no datasets (scalelab's workers read their shards themselves);
- on a local Ray instance scalelab started (`launch.ensure_ray`), the placement-group cleaner. It removes
  the worker group's placement group when the controller dies without doing so itself (a placement group
  lives as long as the job, not its creator: the CPUs it holds would never come back for the next trial).
  Here the launcher does that instead: the controller sends it the group's placement group
  (`PlacementGroupRecord`), and `remove_leftovers` removes it after `fit()` if it is still there. Not
  covered: the launching process dying while the instance lives on (a sweep's trial actor killed); the
  group's CPUs then come back when the sweep's job ends. On a cluster the cleaner stays.

Both rely on Ray Train's internal callback API (`_create_default_callbacks`, the worker-group callbacks;
ray is pinned in constraints.txt): `tests/train/test_trainer.py` fails on a Ray that changes them.
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.execution.callback import WorkerGroupCallback

__all__ = ["PlacementGroupRecord", "remove_leftovers", "trainer_class"]


class PlacementGroupRecord(WorkerGroupCallback):
    """Runs in the controller: sends each worker group's placement group to the launcher through the
    run's channel (`train.progress`), as `{"run": run_id, "placement_group": pg}`."""

    def __init__(self, run_id: str, sender: Any) -> None:
        self.run_id, self.sender = run_id, sender

    def after_worker_group_start(self, worker_group: Any) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        # Delivered before the workers start training: a controller killed right after still told it.
        self.sender.deliver({"run": self.run_id, "placement_group": group})


def remove_leftovers(groups: list[Any]) -> int:
    """Remove those of `groups` (placement groups) that still exist: how many. A controller that ended
    normally removed its own; one that died left it holding its CPUs."""
    if not groups:
        return 0
    from ray.util import placement_group_table, remove_placement_group

    removed = 0
    for group in groups:
        try:
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove_placement_group(group)
                removed += 1
        except Exception:  # Ray itself is gone (an interrupted command), and the group with it
            pass
    return removed


def trainer_class(*, local: bool) -> type:
    """Ray Train's `TorchTrainer` without the Ray Data actor when it has no datasets, and without the
    placement-group cleaner when `local` (a local Ray instance scalelab started; see the module)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    unneeded = (PlacementGroupCleanerCallback,) if local else ()

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            left_out = unneeded if self.datasets else (*unneeded, DatasetsCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, left_out)]

    return Trainer
