"""What a person sees while scalelab works: a live view of the runs on the terminal, everything else
(Ray, Ray Data, DeepSpeed, the workers' own lines) in a log file whose path is shown.

`session(log_path, verbose=False)` points the process's file descriptors 1 and 2 at the log file — at
the descriptor level, because Ray forwards its workers' output to the driver's fd 1/2 and its own
loggers hold the original `sys.stderr` — and gives back a `Console` that still writes to the
terminal. `verbose=True` keeps the raw stream on the terminal as before (`--verbose`).

`RunTable` holds one row per run (trial or single run): state, step/steps, loss, the current
samples/s, ETA and the metric. `LiveView` shows it: a `rich` live table on a terminal; on anything else
(a CI log, `ray job logs`, a pipe) plain text, printed on every state change and at most every
`interval` seconds otherwise, so logs stay readable.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console as RichConsole
from rich.live import Live
from rich.table import Table

__all__ = ["Console", "LiveView", "RunRow", "RunTable", "current", "session"]

FINAL_STATES = ("TERMINATED", "ERROR", "FAILED", "FINISHED")


class Console:
    """The terminal, as the user's lines reach it (see the module docstring)."""

    def __init__(self, out: TextIO | None = None, log_path: Path | None = None) -> None:
        self.out = out or sys.stdout
        self.log_path = log_path
        self.rich = RichConsole(file=self.out, highlight=False, soft_wrap=True)

    @property
    def interactive(self) -> bool:
        return self.rich.is_terminal and not self.rich.is_dumb_terminal

    def say(self, text: str) -> None:
        """One line for the user (no markup: paths and trial names print as they are)."""
        self.rich.print(text, markup=False)
        self.out.flush()


_current: list[Console] = []


def current() -> Console:
    """The console of the innermost active `session`, else a plain one on sys.stdout."""
    return _current[-1] if _current else Console()


@contextlib.contextmanager
def session(log_path: str | Path | None, *, verbose: bool = False) -> Iterator[Console]:
    """Everything the process (and the Ray workers it hears from) prints goes to `log_path` (appended),
    except what goes through the yielded `Console`; restored on exit. With `verbose` or without a path,
    nothing is redirected."""
    if verbose or log_path is None or _current:  # a nested session keeps the outer one's log
        console = _current[-1] if _current and not verbose else Console()
        _current.append(console)
        try:
            yield console
        finally:
            _current.pop()
        return
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    terminal = _terminal()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = (os.dup(1), os.dup(2))
    with path.open("a", buffering=1) as log:
        log.write(f"\n===== scalelab {' '.join(sys.argv[1:])} — {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        console = Console(terminal, path)
        _current.append(console)
        try:
            yield console
        finally:
            _current.pop()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if terminal is not sys.stdout:
                terminal.close()


def _terminal() -> TextIO:
    """A stream to what fd 1 is now (the terminal), that survives fd 1 being pointed elsewhere. When
    sys.stdout is not fd 1 (e.g. a test's capture), sys.stdout itself."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd = None
    if fd != 1:
        return sys.stdout
    return open(os.dup(1), "w", buffering=1, encoding=getattr(sys.stdout, "encoding", None) or "utf-8")


@dataclass
class RunRow:
    """One run of the view: what its last report said."""

    name: str
    state: str = "PENDING"
    step: int = 0
    steps: int = 0
    loss: float | None = None
    batch: int = 0
    rate: float | None = None  # samples/s now (since the previous report)
    metric: float | None = None

    @property
    def eta_s(self) -> float | None:
        if self.steps and self.step >= self.steps:
            return 0.0
        if not (self.rate and self.batch and self.steps):
            return None
        return (self.steps - self.step) * self.batch / self.rate


@dataclass
class RunTable:
    """Every run's row, in the order they were added; `metric` names the last column."""

    metric: str
    rows: dict[str, RunRow] = field(default_factory=dict)

    def row(self, name: str, *, steps: int = 0, batch: int = 0) -> RunRow:
        r = self.rows.setdefault(name, RunRow(name))
        r.steps, r.batch = steps or r.steps, batch or r.batch
        return r

    def update(self, name: str, result: dict[str, Any]) -> None:
        """A run's report (MLflow keys: step, train/loss, train/samples_per_s_current, the metric)."""
        r = self.row(name)
        if "step" in result:
            r.step = int(result["step"])
        r.loss = _number(result.get("train/loss"), r.loss)
        r.rate = _number(result.get("train/samples_per_s_current"), r.rate)
        r.metric = _number(result.get(self.metric), r.metric)

    def render(self) -> Table:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name, justify in (("run", "left"), ("state", "left"), ("step", "right"), ("loss", "right"),
                              ("samples/s", "right"), ("ETA", "right"), (_short(self.metric), "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for r in self.rows.values():
            table.add_row(r.name, r.state, _steps(r), _fmt(r.loss, ".3f"), _fmt(r.rate, ".1f"),
                          _clock(r.eta_s), _fmt(r.metric, ".4f"))
        return table

    def lines(self) -> list[str]:
        """The same table as plain text (logs, pipes)."""
        head = (f"{'run':<28} {'state':<11} {'step':>11} {'loss':>7} {'samples/s':>10} {'ETA':>8} "
                f"{_short(self.metric):>14}")
        return [head] + [f"{r.name:<28} {r.state:<11} {_steps(r):>11} {_fmt(r.loss, '.3f'):>7} "
                         f"{_fmt(r.rate, '.1f'):>10} {_clock(r.eta_s):>8} {_fmt(r.metric, '.4f'):>14}"
                         for r in self.rows.values()]

    def summary(self) -> str:
        done = sum(r.state in FINAL_STATES for r in self.rows.values())
        return f"--- {done}/{len(self.rows)} runs ended ---"


class LiveView:
    """Shows a `RunTable` on a `Console` while its runs train (see the module docstring)."""

    def __init__(self, console: Console, table: RunTable, *, interval: float = 30.0) -> None:
        self.console, self.table, self.interval = console, table, interval
        self._live: Live | None = None
        self._last = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> LiveView:
        if self.console.interactive:
            self._live = Live(self.table.render(), console=self.console.rich, refresh_per_second=2,
                              transient=False, get_renderable=self.table.render)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        else:
            self.changed(force=True)

    def say(self, text: str) -> None:
        """A line above the live table (an event: resumed, failed, refitted)."""
        with self._lock:
            self.console.say(text)

    def changed(self, *, force: bool = False) -> None:
        """Something in the table changed; plain mode prints it on `force` or after `interval`."""
        if self._live is not None:
            return  # the live display redraws itself
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            with self._lock:
                self.console.say("\n".join([self.table.summary(), *self.table.lines()]))


def _number(value: Any, default: float | None) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _steps(r: RunRow) -> str:
    return f"{r.step}/{r.steps}" if r.steps else (str(r.step) if r.step else "")


def _short(metric: str) -> str:
    return metric.split("/", 2)[-1]


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
