"""Fault injection for tests: the one hook through which a test makes a training worker fail.

With `SCALELAB_FAIL_AT_STEP=k` in the worker environment (`launch.worker_env` passes these variables
through), rank `SCALELAB_FAIL_RANK` (default 0) raises once when it reaches step k, leaving the marker
file `SCALELAB_FAIL_MARKER` so that the worker group Ray restarts runs on. The error is an ordinary
`RuntimeError`: Ray retries it like a crashed worker, which is what the tests exercise.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FAIL_AT_STEP_ENV", "FAIL_MARKER_ENV", "FAIL_RANK_ENV", "FAULT_ENV", "maybe_inject_failure"]

FAIL_AT_STEP_ENV = "SCALELAB_FAIL_AT_STEP"
FAIL_RANK_ENV = "SCALELAB_FAIL_RANK"
FAIL_MARKER_ENV = "SCALELAB_FAIL_MARKER"
FAULT_ENV = (FAIL_AT_STEP_ENV, FAIL_RANK_ENV, FAIL_MARKER_ENV)


def maybe_inject_failure(step: int, rank: int) -> None:
    """Raise once at the configured step on the configured rank (a no-op without the variables)."""
    at = os.environ.get(FAIL_AT_STEP_ENV)
    if at is None or int(at) != step or int(os.environ.get(FAIL_RANK_ENV, "0")) != rank:
        return
    marker = Path(os.environ.get(FAIL_MARKER_ENV, ""))
    if not marker.name or marker.exists():
        return
    marker.write_text(str(step))
    raise RuntimeError(f"injected failure at step {step} on rank {rank} ({FAIL_AT_STEP_ENV})")
