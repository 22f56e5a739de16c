"""Tune callbacks of the sweep driver: the live trial view, and the refit after each finished trial."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from scalelab.console import LiveView, RunTable
from scalelab.sweep.results import SweepState

__all__ = ["Coalescing", "LiveTrials", "Refit", "failure_reason"]


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
    """After each finished trial: collect the results from MLflow, refit, re-log plots on the parent —
    in a background thread of the driver. Tune calls its callbacks inside its scheduling loop, so a refit
    there held the next trial's start for as long as it took (0.8 s after the first trial of a 4-trial
    sweep, 3.8 s after the fourth: it reads every trial's history and redraws every plot). Completions
    during a refit coalesce into one more refit; a finished trial's loss curve is read from MLflow once
    (`collect_results`' cache: 0.22 → 0.03 s per refit at the demo's 27 trials). `close()` waits for a
    running refit and drops a pending one: the sweep's final analysis comes next. Holds only a key into
    `_REFITS` (picklable, as Tune requires; a restored copy without its thread in this process starts one
    on demand)."""

    def __init__(self, state: SweepState) -> None:
        self.state = state
        self.key = f"{state.name}:{state.parent_run_id}"

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # (Tune marks `trial` itself as finished only after its callbacks.)
        if len(trials) >= len(self.state.trials) and all(t.is_finished() for t in trials if t is not trial):
            return  # the last trial: the sweep's final analysis follows at once
        if self.key not in _REFITS:
            work = functools.partial(_refit, self.state, {})  # {}: finished trials' curves, kept
            # niced: on a machine the trials fill, their start-up (process starts, imports) goes first
            _REFITS[self.key] = Coalescing(work, name=f"refit-{self.state.name}", nice=10)
        _REFITS[self.key].request()

    def close(self) -> None:
        if (work := _REFITS.pop(self.key, None)) is not None:
            work.close()


def _refit(state: SweepState, curves: dict) -> None:
    from scalelab.sweep.analysis import analyse, log_analysis
    from scalelab.sweep.results import collect_results
    from scalelab.train.timeline import mark

    mark("refit_started")
    try:
        results = collect_results(state, curves)
        with tempfile.TemporaryDirectory(prefix="scalelab-analysis-") as scratch:
            log_analysis(state, results, analyse(state, results), Path(scratch))
    except Exception as err:  # an analysis problem must not stop the sweep; the final one reports it
        print(f"[{state.name}] refit failed: {err!r}", file=sys.stderr)
    mark("refit_done")


class Coalescing:
    """Runs `work` in one background thread whenever it was requested since its last start: requests
    that arrive while it runs make one more run, not one each. `nice` > 0 lowers the thread's CPU
    priority (where the OS schedules threads by it, as Linux does)."""

    def __init__(self, work: Callable[[], None], name: str, nice: int = 0) -> None:
        self._work, self._nice = work, nice
        self._wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def close(self) -> None:
        """Wait for a running `work` to end; a request not yet started is dropped."""
        self._closing = True
        self._wanted.set()
        self._thread.join()

    def _loop(self) -> None:
        if self._nice:
            with contextlib.suppress(AttributeError, OSError):  # Linux: a thread has its own nice value
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        while True:
            self._wanted.wait()
            if self._closing:
                return
            self._wanted.clear()
            self._work()


_REFITS: dict[str, Coalescing] = {}  # the refit threads of this process by key (see Refit)
