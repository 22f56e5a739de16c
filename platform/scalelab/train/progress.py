"""Progress from the training workers to the driver while `fit()` runs, without stalling training.

Rank 0 sends the metrics of every logging step and evaluation (MLflow keys, plus `step`) into a Ray
queue owned by the driver. Sending is fire-and-forget — an actor call nobody waits for, well under a
millisecond — where a `ray.train.report` is a barrier that waits for Ray Train's controller to
collect it (its next worker poll): reporting to Ray at every logging step cost a `nano` run a third of
its time (BENCHMARKS.md, *Loop overhead*), so Ray Train now hears only the checkpoint reports.
`flush` waits for the sends before it (actor calls from one caller run in order), so everything rank 0
sent has arrived before `fit()` returns. On the driver, `progress_channel(handle)` makes the queue and
calls `handle(metrics)` for each item from a helper thread, the last ones once `fit()` returned: the
live view of `scalelab train`, a sweep trial's reports to Tune.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["flush", "progress_channel", "send"]


@contextlib.contextmanager
def progress_channel(handle: Callable[[dict[str, Any]], None]) -> Iterator[Queue]:
    """The queue to give the workers; every item they sent (and flushed) reaches `handle` before this
    exits."""
    # The queue's actor lives on this process's node: placed anywhere, it could sit on a worker node, and
    # when that node is lost the group Ray restarts would fail on its first report to the dead queue.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    stop = threading.Event()

    def pump() -> None:
        while not (stop.is_set() and queue.empty()):
            with contextlib.suppress(Empty):
                handle(queue.get(timeout=0.25))

    thread = threading.Thread(target=pump, name="progress-channel", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=60)
        queue.shutdown()


def send(queue: Queue | None, item: dict[str, Any]) -> None:
    """Put `item` on the driver's queue without waiting (no-op without a queue)."""
    if queue is not None:
        queue.actor.put_nowait.remote(item)


def flush(queue: Queue | None) -> None:
    """Wait until every item sent from this process has arrived (no-op without a queue)."""
    if queue is None:
        return
    # The queue dies only with the driver's node, and then this run's driver is gone too: progress is
    # for display, so a lost queue ends nothing here.
    with contextlib.suppress(ray.exceptions.RayActorError):
        ray.get(queue.actor.qsize.remote())
