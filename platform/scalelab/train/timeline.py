"""Wall-clock marks of a run's start-up and shut-down, for `benchmarks/startup.py`.

With `SCALELAB_TIMELINE=<file>` set (the driver's environment; `launch.worker_env` passes it to the
workers), the driver and rank 0 append one JSON line per mark: `{"t": unix time, "pid", "event", ...}`.
Without it `mark` does nothing. The marks name the phases the fixed cost of a run is made of (Ray,
the MLflow run, the worker group, imports, the engine, the data, the first steps, the last checkpoint,
shutdown), so a benchmark can say where the seconds go instead of guessing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__all__ = ["TIMELINE_ENV", "mark"]

TIMELINE_ENV = "SCALELAB_TIMELINE"


def mark(event: str, **fields: Any) -> None:
    """Append `event` (with `fields`) to the timeline file, if one is set."""
    path = os.environ.get(TIMELINE_ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields})
    with open(path, "a", encoding="utf-8") as f:  # one short write per line: appends do not interleave
        f.write(line + "\n")
