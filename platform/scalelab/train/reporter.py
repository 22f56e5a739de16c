"""One set of metric keys to two places: the driver (rank 0, through `train.progress`: the driver stores
them in MLflow — `train.sink` — and shows them in the live view or reports them to Tune) and Ray Train's
checkpoint reports; plus the progress line in the run's log.

`ray.train.report` is a barrier: every rank calls `report` at the same steps — the checkpoint steps,
each with its checkpoint share (written to a local folder, which Ray merges on storage). Logging steps
do not report to Ray: a report waits for Ray Train's controller to collect it, the channel to the driver
does not; before each report rank 0 waits until the driver has stored everything it sent, so MLflow
holds every step up to a checkpoint. A training worker never imports MLflow.
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
from scalelab.train.progress import Sender

__all__ = ["Reporter"]


class Reporter:
    """Every rank has one; only rank 0's talks to MLflow and the console."""

    def __init__(self, plan: WorkerPlan, rank: int, run: RunState, sender: Sender | None = None) -> None:
        self.cfg, self.rank, self.run_id = plan.experiment, rank, plan.mlflow_run_id
        self.sender = sender if rank == 0 else None  # to the driver: MLflow, the live view
        self._t0, self._s0 = time.perf_counter(), run.step
        self._last_t, self._last_step = self._t0, run.step

    def say(self, text: str) -> None:
        """A line on the driver's console (rank 0 only)."""
        if self.rank != 0:
            return
        # Straight to the process's stdout (Ray forwards it to the driver): Ray Train patches `print`
        # to also log, and with MLflow wrapping sys.stdout every line would appear twice.
        sys.__stdout__.write(f"[{self.cfg.name}] {text}\n")
        sys.__stdout__.flush()

    def _send_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Asynchronous: the driver stores them as training goes on (`_flush` at reports waits)."""
        if self.sender:
            values = {k: float(v) for k, v in metrics.items() if v is not None}
            self.sender.send({"run": self.run_id, "step": step, "t": int(time.time() * 1000),
                              "metrics": values})

    def _flush(self) -> None:
        if self.sender:
            for note in self.sender.flush():  # the driver's: a replayed step whose loss differs
                self.say(note)

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
        self._send_metrics(metrics, step)
        left = (self.cfg.train.steps - step) * batch / max(current, 1e-9)
        self.say(f"step {step}/{self.cfg.train.steps} | loss {metrics['train/loss']:.4f} | "
                 f"{current:.1f} samples/s | ETA {_clock(left)}")

    def log_eval(self, metrics: dict[str, float] | None, step: int, final: bool) -> None:
        if not metrics or self.rank != 0:
            return
        self._send_metrics(metrics, step)
        if final and self.sender:
            self.sender.send({"run": self.run_id, "dict": dict(metrics), "file": "eval/final.json"})
        if self.sender:  # the metric shows now, not with the next logging step
            self.sender.push()
        shown = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.endswith(("top1", "i2t_r1"))}
        self.say("eval " + " | ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())))

    def close(self) -> None:
        """Everything sent is handled by the driver, MLflow included (rank 0; before the worker
        returns)."""
        self._flush()

    def push(self) -> None:
        """What rank 0 holds (`Sender.send`) goes to the driver now, without waiting: before an
        evaluation, which may take a while (the live view shows the step it runs at), and on a crash
        (the steps since the last checkpoint reach MLflow, whether Ray restarts the group or not)."""
        if self.sender:
            self.sender.push()

    def report(self, run: RunState, metrics: dict[str, Any], evaluated: dict[str, float] | None,
               save: Callable[[str], None] | None = None) -> None:
        """`ray.train.report` with the MLflow keys (and `step`, MLflow's x-axis); with `save`, this
        rank's checkpoint share written by `save(folder)` goes with it."""
        self._flush()  # MLflow holds every step up to this report (and its checkpoint)
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
