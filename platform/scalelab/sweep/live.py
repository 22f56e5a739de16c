"""Tune callbacks of the sweep driver: the live trial view, and the refit after each finished trial."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback

from scalelab.console import LiveView, RunTable
from scalelab.sweep.results import SweepState

__all__ = ["LiveTrials", "Refit", "failure_reason"]


# The views of this process by key: Tune pickles (and may copy) its callbacks, a view holds the terminal.
_VIEWS: dict[str, tuple[RunTable, LiveView, Path | None]] = {}


class LiveTrials(Callback):
    """Feeds the sweep's `RunTable` (one row per planned trial) from Tune's events and the trials'
    reports, and tells the `LiveView` what changed; a failed trial also gets a line with its reason
    and the log file. Holds only a key into `_VIEWS` (picklable; a restored copy without its view in
    this process does nothing)."""

    def __init__(self, key: str, table: RunTable, view: LiveView, log_path: Path | None) -> None:
        self.key = key
        _VIEWS[key] = (table, view, log_path)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.key in _VIEWS:
            table, view, _ = _VIEWS[self.key]
            table.update(str(trial), result)
            table.row(str(trial)).state = trial.status
            view.changed()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._state(trial, "RUNNING")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._state(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.key in _VIEWS:
            _, view, log_path = _VIEWS[self.key]
            where = f"; details in {log_path}" if log_path else ""
            view.say(f"[{trial}] failed: {failure_reason(trial)}{where}")
        self._state(trial, "ERROR")

    def close(self) -> None:
        _VIEWS.pop(self.key, None)

    def _state(self, trial: Any, state: str) -> None:
        if self.key in _VIEWS:
            table, view, _ = _VIEWS[self.key]
            table.row(str(trial)).state = state
            view.changed(force=True)


def failure_reason(trial: Any) -> str:
    """One line: the exception that ended the trial (its innermost cause), not Ray's traceback."""
    try:
        err = trial.get_pickled_error()
    except Exception:  # an unreadable error file: say so rather than fail the sweep's console
        err = None
    while err is not None and getattr(err, "cause", None) is not None and err.cause is not err:
        err = err.cause
    if err is None:
        return "no error recorded"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


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
