"""Train reports back to the driver while `fit()` runs: the live view of `scalelab train` and a sweep
trial's reports to Tune.

Ray Train's callbacks run in its controller actor, not in the process that called `fit()`.
`ForwardReports` (a `UserCallback`) puts rank 0's metrics of every report into a Ray queue as the
controller receives them; `forwarded_reports(handle)` gives the driver one and calls `handle(metrics)`
for each queued report from a helper thread, the last ones once `fit()` returned.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ray.train import UserCallback
from ray.util.queue import Empty, Queue

__all__ = ["ForwardReports", "forwarded_reports"]


class ForwardReports(UserCallback):
    """Runs in the Train controller: rank 0's metrics of every report into `queue`."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put(dict(metrics[0]))  # returns once the queue actor holds it


@contextlib.contextmanager
def forwarded_reports(handle: Callable[[dict[str, Any]], None]) -> Iterator[ForwardReports]:
    """The callback to give `fit()`; every report it forwards reaches `handle` before this exits."""
    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()

    def pump() -> None:
        while not (stop.is_set() and queue.empty()):
            with contextlib.suppress(Empty):
                handle(queue.get(timeout=0.25))

    thread = threading.Thread(target=pump, name="forwarded-reports", daemon=True)
    thread.start()
    try:
        yield ForwardReports(queue)
    finally:
        stop.set()
        thread.join(timeout=60)
        queue.shutdown()
