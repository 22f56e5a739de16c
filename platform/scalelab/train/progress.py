"""Rank 0's metrics to the driver while `fit()` runs: the driver stores them in MLflow and shows them.

Rank 0 sends the metrics of every logging step and evaluation into a small actor on the driver's node
(the hub). Sending is fire-and-forget — an actor call nobody waits for, well under a millisecond — where
a `ray.train.report` is a barrier that waits for Ray Train's controller to collect it (its next worker
poll): reporting to Ray at every logging step cost a `nano` run a third of its time (BENCHMARKS.md, *Loop
overhead*), so Ray Train hears only the checkpoint reports. Items sent less than `SEND_EVERY_S` after
the previous call go out together with the next one (or the next `push`/`flush`): a small model logging
every 10 steps sends ~8 items a second, and every call, take and MLflow write they cost the driver and
the hub is CPU time taken from training on a machine whose cores the trials fill.

On the driver, `channel(consume)` runs a helper thread that takes what arrived and hands it to
`consume` (store it in MLflow, show it in the live view, report it to Tune), then tells the hub how many
items are handled. `Sender.flush` — before every checkpoint report and at the end — waits until every
item it sent is handled, so MLflow holds every step up to a checkpoint, and raises what storing them
failed with.

Why MLflow is written by the driver, not by the worker: MLflow in a training worker costs its import and
the store's first queries on the way to the first step, its SQLAlchemy work holds the GIL the training
loop needs, and a helper process of its own for it is one more Python process starting per trial on
cores the trial's start-up needs. The driver has MLflow loaded and its store open already (it made the
run). For the same reason the hub outlives a run: the driver's next run (a sweep's trial actor runs one
trial after another) reuses it instead of starting another actor process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["ChannelError", "Sender", "channel"]

# What `consume` returns for a batch of items: notes to say on rank 0's console, and a failure or None.
Handled = tuple[list[str], str | None]
_TAKE_POLL_S = 0.1  # the driver asks for new items this often when there were none
_FLUSH_POLL_S = 0.005
SEND_EVERY_S = 0.5  # the most often rank 0 puts items on the channel (the live view lags by as much)


class ChannelError(RuntimeError):
    """The driver could not handle what rank 0 sent (e.g. storing it in MLflow failed)."""


class _Hub:
    """Items in order from rank 0, and how many of them the driver has handled. A plain actor: it runs
    one call at a time, in the order each caller made them (an async actor does not promise that)."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._put = self._done = 0
        self._notes: list[str] = []
        self._error: str | None = None

    def start(self) -> None:
        """A new run: what an earlier one left (it ended without flushing) counts as handled."""
        self._items, self._done, self._notes, self._error = [], self._put, [], None

    def put(self, items: list[dict[str, Any]]) -> None:
        self._items += items
        self._put += len(items)

    def take(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items

    def handled(self, count: int, notes: list[str], error: str | None) -> None:
        self._done += count
        self._notes += notes
        self._error = self._error or error

    def collect(self, target: int | None) -> tuple[int, bool, list[str], str | None]:
        """(target, whether the driver handled the first `target` items, its notes and failure since
        the previous collect, when it did). Without a target: every item put so far, which includes
        everything the caller sent before this call."""
        target = self._put if target is None else target
        if self._done < target:
            return target, False, [], None
        notes, error, self._notes, self._error = self._notes, self._error, [], None
        return target, True, notes, error


class Sender:
    """Rank 0's end of the channel (pickled into the workers' config; what it holds is not)."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self._held: list[dict[str, Any]] = []
        self._pushed_at = -float("inf")

    def __getstate__(self) -> dict[str, Any]:
        return {"hub": self.hub}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["hub"])

    def send(self, item: dict[str, Any]) -> None:
        """Put `item` on the channel without waiting; within `SEND_EVERY_S` of the previous put it is
        held until the next `send`, `push` or `flush` (the module docstring)."""
        self._held.append(item)
        if time.monotonic() - self._pushed_at >= SEND_EVERY_S:
            self.push()

    def push(self) -> None:
        """Put what `send` holds on the channel now, without waiting (an evaluation, a crash)."""
        if self._held:
            self.hub.put.remote(self._held)
            self._held, self._pushed_at = [], time.monotonic()

    def deliver(self, item: dict[str, Any]) -> None:
        """Put `item` on the channel and wait until the hub holds it (not until the driver handled it):
        for a sender that may die right after, whose pending calls would die with it."""
        self.push()
        ray.get(self.hub.put.remote([item]))

    def flush(self) -> list[str]:
        """Wait until the driver handled everything sent before; its notes. ChannelError when handling
        failed (once per failure); Ray's actor error when the driver is gone."""
        self.push()
        target, done, notes, error = ray.get(self.hub.collect.remote(None))
        while not done:
            time.sleep(_FLUSH_POLL_S)
            target, done, notes, error = ray.get(self.hub.collect.remote(target))
        if error:
            raise ChannelError(error)
        return notes


_HUB: dict[tuple[str, str], Any] = {}  # (node id, job id) of this driver -> its hub


def _hub() -> Any:
    """This driver's hub: the one an earlier run of this process made, while it lives; else a new one.
    It lives on this process's node: placed anywhere, it could sit on a worker node, and when that node
    is lost the group Ray restarts would fail on its first send."""
    context = ray.get_runtime_context()
    key = (context.get_node_id(), context.get_job_id())
    hub = _HUB.get(key)
    if hub is not None:
        try:
            ray.get(hub.start.remote(), timeout=30)
            return hub
        except (ray.exceptions.RayError, TimeoutError):
            pass
    here = NodeAffinitySchedulingStrategy(key[0], soft=False)
    hub = ray.remote(_Hub).options(num_cpus=0, scheduling_strategy=here).remote()
    _HUB.clear()  # a hub of an earlier Ray instance of this process is gone with it
    _HUB[key] = hub
    ray.get(hub.start.remote())
    return hub


@contextlib.contextmanager
def channel(consume: Callable[[list[dict[str, Any]]], Handled]) -> Iterator[Sender]:
    """The sender to give rank 0; `consume(items)` gets everything it sends, in order, from a helper
    thread, the last items before this exits."""
    hub = _hub()
    stop = threading.Event()

    def pump() -> None:
        while True:
            # Ends on an empty take that began after fit() returned: what was put before it (the
            # controller's last item, say) is still handed over, not left in the hub.
            stopping = stop.is_set()
            try:
                items = ray.get(hub.take.remote())
            except ray.exceptions.RayError:  # Ray or the hub is gone, and with it the run: nothing to take
                return
            if items:
                try:
                    notes, error = consume(items)
                except Exception as err:  # told to rank 0 by its next flush
                    notes, error = [], f"{type(err).__name__}: {err}"
                hub.handled.remote(len(items), notes, error)
            elif stopping:
                return
            else:
                stop.wait(_TAKE_POLL_S)

    thread = threading.Thread(target=pump, name="progress-channel", daemon=True)
    thread.start()
    try:
        yield Sender(hub)
    finally:
        stop.set()
        thread.join(timeout=60)
