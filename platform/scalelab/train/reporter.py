"""One set of metric keys to three places: MLflow (rank 0), the driver's progress queue (rank 0:
`train.progress`, the live view and a sweep's reports to Tune) and Ray Train's checkpoint reports; plus
the progress line in the run's log.

`ray.train.report` is a barrier: every rank calls `report` at the same steps — the checkpoint steps,
each with its checkpoint share (written to a local folder, which Ray merges on storage). Logging steps
do not report to Ray: a report waits for Ray Train's controller to collect it, the progress queue does
not. MLflow gets each metric
at step = global step, and only past the last step the run already holds: a restart replays the steps
after its checkpoint bit for bit (checked here: a differing replayed loss is reported), and MLflow
appends, so a replayed step would otherwise appear twice.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray.train

from scalelab.train.checkpoint import RunState, checkpoint_name
from scalelab.train.plan import WorkerPlan
from scalelab.train.progress import flush, send

__all__ = ["Reporter", "run_handle"]


def run_handle(plan: WorkerPlan, rank: int) -> Any:
    """Rank 0's MLflow run (None elsewhere, or without a run), its writer process already started: called
    before the engine is built, the writer's imports run beside that instead of beside the first steps."""
    if rank != 0 or not (plan.mlflow_run_id and plan.tracking_uri):
        return None
    from scalelab.tracking import RunHandle

    handle = RunHandle(plan.tracking_uri, plan.mlflow_run_id)
    handle.start_writer()
    return handle


class Reporter:
    """Every rank has one; only rank 0's talks to MLflow and the console."""

    def __init__(self, plan: WorkerPlan, rank: int, run: RunState, progress: Any = None,
                 handle: Any = None) -> None:
        self.cfg, self.rank = plan.experiment, rank
        self.progress = progress if rank == 0 else None
        self.handle = handle if rank == 0 else None  # `run_handle(plan, rank)`
        self._t0, self._s0 = time.perf_counter(), run.step
        self._last_t, self._last_step = self._t0, run.step
        self._logged = self.handle.last_steps() if self.handle else {}
        self._logged_loss = self.handle.history("train/loss") if "train/loss" in self._logged else {}

    def say(self, text: str) -> None:
        """A line on the driver's console (rank 0 only)."""
        if self.rank != 0:
            return
        # Straight to the process's stdout (Ray forwards it to the driver): Ray Train patches `print`
        # to also log, and with MLflow wrapping sys.stdout every line would appear twice.
        sys.__stdout__.write(f"[{self.cfg.name}] {text}\n")
        sys.__stdout__.flush()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Training metrics of a logging step: the rates, MLflow, the progress line.

        Two rates: `train/samples_per_s` averages since this process started training (start-up and
        warm-up included); `train/samples_per_s_current` covers the steps since the previous logging
        step only, so a slow-down shows at once (the live view and the ETA use it)."""
        now, batch = time.perf_counter(), self.cfg.train.global_batch
        rate = (step - self._s0) * batch / max(now - self._t0, 1e-9)
        current = (step - self._last_step) * batch / max(now - self._last_t, 1e-9)
        self._last_t, self._last_step = now, step
        metrics["train/samples_per_s"] = rate
        metrics["train/samples_per_s_current"] = current
        if self.rank != 0:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        send(self.progress, {**values, "step": step})
        if self.handle:  # asynchronous: a writer process stores it as training goes on (flushed at reports)
            self.handle.log_metrics(values, step, logged=self._logged, synchronous=False)
            before = self._logged_loss.get(step)
            if before is not None and repr(before) != repr(values["train/loss"]):  # exact; NaN == NaN
                self.say(f"warning: replayed step {step} gives loss {values['train/loss']!r}, the run logged "
                         f"{before!r} (kept): this run is not reproducible here")
        left = (self.cfg.train.steps - step) * batch / max(current, 1e-9)
        self.say(f"step {step}/{self.cfg.train.steps} | loss {metrics['train/loss']:.4f} | "
                 f"{current:.1f} samples/s | ETA {_clock(left)}")

    def log_eval(self, metrics: dict[str, float] | None, step: int, final: bool) -> None:
        if not metrics or self.rank != 0:
            return
        send(self.progress, {**metrics, "step": step})
        if self.handle:
            self.handle.log_metrics(metrics, step, logged=self._logged, synchronous=False)
            if final:
                self.handle.log_dict(metrics, "eval/final.json")
        shown = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.endswith(("top1", "i2t_r1"))}
        self.say("eval " + " | ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())))

    def close(self) -> None:
        """Everything logged is in MLflow and everything sent has reached the driver (rank 0; before
        the worker returns)."""
        if self.handle:
            self.handle.close()
        flush(self.progress)

    def report(self, run: RunState, metrics: dict[str, Any], evaluated: dict[str, float] | None,
               save: Callable[[str], None] | None = None) -> None:
        """`ray.train.report` with the MLflow keys (and `step`, MLflow's x-axis); with `save`, this
        rank's checkpoint share written by `save(folder)` goes with it."""
        if self.handle:  # MLflow holds every step up to this report (and its checkpoint)
            self.handle.flush()
        report = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        report.update({"step": run.step, **(evaluated or {})})
        if save is None:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory(prefix="scalelab-ckpt-") as tmp:
            save(tmp)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_name(run.step))


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
