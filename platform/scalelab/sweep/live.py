"""Tune callbacks of the sweep driver: the live trial table, and the refit after each finished trial."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from scalelab.sweep.results import SweepState

__all__ = ["LiveTable", "Refit"]


class LiveTable(Callback):
    """A table of every trial (state, samples seen, loss, metric), printed when something changed and
    at most every `interval` seconds; always on a state change (start, finish, error)."""

    def __init__(self, metric: str, total: int, *, quiet: bool = False, interval: float = 15.0) -> None:
        # No callable attributes: Tune pickles its callbacks into the experiment state (for restore).
        self.metric, self.total, self.quiet, self.interval = metric, total, quiet, interval
        self._latest: dict[str, dict[str, Any]] = {}
        self._last_print = 0.0
        self._dirty = False

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._latest.setdefault(str(trial), {}).update(result)  # the final report lacks train/*
        self._dirty = True

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, force=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, force=True)

    def on_step(self, iteration: int, trials: list, **info: Any) -> None:
        if self._dirty and time.monotonic() - self._last_print >= self.interval:
            self._show(trials)

    def _show(self, trials: list, force: bool = False) -> None:
        self._last_print, self._dirty = time.monotonic(), False
        short = self.metric.split("/", 2)[-1]
        lines = [f"{'trial':<28} {'state':<10} {'samples':>9} {'loss':>7} {short:>14}"]
        for t in sorted(trials, key=str):
            r = self._latest.get(str(t), {})
            loss, value = r.get("train/loss"), r.get(self.metric)
            lines.append(f"{t!s:<28} {t.status:<10} {r.get('train/samples_seen', 0):>9} "
                         f"{'' if loss is None else f'{loss:.3f}':>7} "
                         f"{'' if value is None else f'{value:.4f}':>14}")
        done = sum(t.status == "TERMINATED" for t in trials)
        if not self.quiet:
            waiting = self.total - len(trials)  # Tune creates trials as slots free up
            more = f", {waiting} not started" if waiting > 0 else ""
            head = f"--- trials: {done}/{self.total} finished{more} ---"
            sys.stdout.write(head + "\n" + "\n".join(lines) + "\n")
            sys.stdout.flush()


class Refit(Callback):
    """After each finished trial: collect the results from MLflow, refit, re-log plots on the parent."""

    def __init__(self, state: SweepState) -> None:
        self.state = state

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from scalelab.sweep.analysis import analyse, log_analysis
        from scalelab.sweep.results import collect_results

        try:
            results = collect_results(self.state)
            with tempfile.TemporaryDirectory(prefix="scalelab-analysis-") as scratch:
                log_analysis(self.state, results, analyse(self.state, results), Path(scratch))
        except Exception as err:  # an analysis problem must not stop the sweep; the final one reports it
            print(f"[{self.state.name}] refit after {trial} failed: {err!r}", file=sys.stderr)
