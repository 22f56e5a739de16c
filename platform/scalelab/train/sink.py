"""The driver's end of rank 0's channel (`train.progress`) for one run: MLflow, then the live view.

Metrics are stored in the run at step = global step, and only past the last step the run already holds
(when the run started, or since: a worker group Ray restarts within the run): a restarted group replays
the steps after its checkpoint bit for bit, and MLflow appends, so a replayed step would otherwise appear
twice. The replayed loss is checked against the logged one (exact;
NaN == NaN): a difference comes back to rank 0 as a note, said at its next report. A driver module: the
workers never import it (no MLflow in a training worker).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scalelab.tracking import RunHandle, metric_entries

__all__ = ["RunSink"]


class RunSink:
    """`consume` for `progress.channel`: items of the run `handle` are stored in it; each metrics item
    then goes to `progress` (with its `step`), if given. Items of another run (a late one of the
    driver's previous run) are dropped. The controller sends the placement group of each worker group it
    starts: kept in `placement_groups`, for launch to remove if the controller dies (train/trainer.py)."""

    def __init__(self, handle: RunHandle, progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.handle, self.progress = handle, progress
        self.logged = handle.last_steps()  # {key: last step the run holds}
        self.loss = handle.history("train/loss") if "train/loss" in self.logged else {}
        self.placement_groups: list[Any] = []

    def __call__(self, items: list[dict[str, Any]]) -> tuple[list[str], str | None]:
        notes: list[str] = []
        logged, loss = dict(self.logged), dict(self.loss)
        entries: list[Any] = []  # the metrics of every step in `items`, stored in one write
        shown: list[dict[str, Any]] = []
        for item in items:
            if item.get("run") != self.handle.run_id:
                continue
            if "placement_group" in item:
                self.placement_groups.append(item["placement_group"])
                continue
            if "dict" in item:
                self.handle.log_dict(item["dict"], item["file"])
                continue
            step, metrics = item["step"], item["metrics"]
            notes += _replayed(loss.get(step), step, metrics)
            new = metric_entries(metrics, step, logged=logged, timestamp=item["t"])
            for entry in new:
                logged[entry.key] = step  # a worker group Ray restarts replays it again
            if "train/loss" in metrics and any(e.key == "train/loss" for e in new):
                loss[step] = metrics["train/loss"]
            entries += new
            shown.append({**metrics, "step": step})
        self.handle.log_entries(entries)
        self.logged, self.loss = logged, loss
        if self.progress is not None:
            for metrics in shown:
                self.progress(metrics)
        return notes, None


def _replayed(before: float | None, step: int, metrics: dict[str, float]) -> list[str]:
    """A note when a replayed step's loss differs from the one logged before (`before`)."""
    now = metrics.get("train/loss")
    if before is None or now is None or repr(float(before)) == repr(float(now)):
        return []
    return [f"warning: replayed step {step} gives loss {now!r}, the run logged {before!r} (kept): "
            "this run is not reproducible here"]
