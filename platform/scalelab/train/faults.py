"""Fault injection for tests: the one hook (`maybe_inject_fault`) through which a test makes a training
worker fail or stop where it can be killed.

`launch.worker_env` passes these variables through to the workers; without them the hook does nothing.

- Fail: with `SCALELAB_FAIL_AT_STEP=k`, rank `SCALELAB_FAIL_RANK` (default 0) raises once when it
  reaches step k, leaving the marker file `SCALELAB_FAIL_MARKER` so that the worker group Ray restarts
  runs on. The error is an ordinary `RuntimeError`: Ray retries it like a crashed worker.
- Hold: with `SCALELAB_HOLD_AT_STEP=k` and `SCALELAB_HOLD_RUN=<run name>`, every worker of that run
  waits at step k (after its step-k checkpoint) until it is killed: a deterministic point at which a
  test kills a driver mid-run, however fast the steps are. With `SCALELAB_HOLD_MARKER=<file>` too, the
  hold happens once: a worker that holds writes the file, and workers that find it go on (the group
  Ray restarts after a test removed a node then runs to the end).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["FAIL_AT_STEP_ENV", "FAIL_MARKER_ENV", "FAIL_RANK_ENV", "FAULT_ENV", "HOLD_AT_STEP_ENV",
           "HOLD_MARKER_ENV", "HOLD_RUN_ENV", "maybe_inject_fault"]

FAIL_AT_STEP_ENV = "SCALELAB_FAIL_AT_STEP"
FAIL_RANK_ENV = "SCALELAB_FAIL_RANK"
FAIL_MARKER_ENV = "SCALELAB_FAIL_MARKER"
HOLD_AT_STEP_ENV = "SCALELAB_HOLD_AT_STEP"
HOLD_RUN_ENV = "SCALELAB_HOLD_RUN"
HOLD_MARKER_ENV = "SCALELAB_HOLD_MARKER"
FAULT_ENV = (FAIL_AT_STEP_ENV, FAIL_RANK_ENV, FAIL_MARKER_ENV, HOLD_AT_STEP_ENV, HOLD_RUN_ENV,
             HOLD_MARKER_ENV)


def maybe_inject_fault(step: int, rank: int, run_name: str) -> None:
    """Called before each step with the steps done so far: fail or hold as configured (see above)."""
    if os.environ.get(HOLD_RUN_ENV) == run_name and os.environ.get(HOLD_AT_STEP_ENV) == str(step):
        _hold(Path(os.environ[HOLD_MARKER_ENV]) if os.environ.get(HOLD_MARKER_ENV) else None, rank)
    at = os.environ.get(FAIL_AT_STEP_ENV)
    if at is None or int(at) != step or int(os.environ.get(FAIL_RANK_ENV, "0")) != rank:
        return
    marker = Path(os.environ.get(FAIL_MARKER_ENV, ""))
    if not marker.name or marker.exists():
        return
    marker.write_text(str(step))
    raise RuntimeError(f"injected failure at step {step} on rank {rank} ({FAIL_AT_STEP_ENV})")


def _hold(marker: Path | None, rank: int) -> None:
    """Sleep until killed; with a marker, only where the marker is not there yet (then leave it)."""
    if marker is not None:
        if marker.exists():
            return
        marker.write_text(str(rank))
    while True:
        time.sleep(1.0)
