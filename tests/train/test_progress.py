"""scalelab.train.progress: rank 0's channel to the driver, on a real local Ray (the sender in a Ray task,
as rank 0 is in a Ray Train worker)."""

import threading

import pytest
import ray

from scalelab.train.progress import SEND_EVERY_S, ChannelError, Sender, channel


@ray.remote(num_cpus=0)
def _rank0(sender: Sender, items: list[dict], flush_after: int | None = None) -> list:
    """Send `items` (flushing after the first `flush_after`), then flush: what each flush returned or
    raised, as rank 0 sees it."""
    seen = []
    for i, item in enumerate(items, 1):
        sender.send(item)
        if i == flush_after:
            try:
                seen.append(sender.flush())
            except ChannelError as err:
                seen.append(f"ChannelError: {err}")
    seen.append(sender.flush())
    return seen


def _kill(hub) -> None:
    """`ray.kill`, which takes effect soon after, not at once: wait until the hub answers no more."""
    ray.kill(hub)
    with pytest.raises(ray.exceptions.RayActorError):
        for _ in range(600):
            ray.get(hub.collect.remote(0))
            threading.Event().wait(0.05)


class _Driver:
    """A `consume` that records what it got, slowly (a flush must wait for it), and says or fails what
    an item asks it to."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, items):
        self.calls += 1
        notes, error = [], None
        for item in items:
            threading.Event().wait(0.01)
            with self.lock:
                self.got.append(item["i"])
            notes += [f"note {item['i']}"] if item.get("note") else []
            if item.get("fail"):
                raise RuntimeError(f"cannot store {item['i']}")
        return notes, error


def test_items_arrive_in_order_and_a_flush_waits_until_the_driver_handled_them(local_ray):
    driver = _Driver()
    with channel(driver) as sender:
        seen = ray.get(_rank0.remote(sender, [{"i": i, "note": i == 7} for i in range(40)], flush_after=20))
        # Each flush returned only once everything sent before it was handled, with the notes since the
        # previous flush.
        assert seen == [["note 7"], []]
        with driver.lock:
            assert driver.got == list(range(40))


def test_a_failure_of_the_driver_is_raised_by_the_next_flush_once(local_ray):
    driver = _Driver()
    with channel(driver) as sender:
        items = [{"i": 0}, {"i": 1, "fail": True}, {"i": 2}]
        seen = ray.get(_rank0.remote(sender, items, flush_after=2))
    assert seen[0] == "ChannelError: RuntimeError: cannot store 1"
    assert seen[1] == []  # reported once; the channel goes on
    assert 2 in driver.got


def test_the_next_run_of_a_driver_reuses_its_hub_while_it_lives(local_ray):
    """A sweep's trial actor runs trial after trial: one hub (an actor process) for all of them."""
    failing = _Driver()
    with channel(failing) as first:  # a run that ends (crashes) without its last flush
        first.send({"i": 0, "fail": True, "note": True})
        while not failing.got:
            threading.Event().wait(0.01)
    with channel(_Driver()) as second:
        assert second.hub._actor_id == first.hub._actor_id
        assert ray.get(_rank0.remote(second, [{"i": 1}])) == [[]]  # nothing of the run before
    _kill(second.hub)
    driver = _Driver()
    with channel(driver) as third:  # a lost hub is replaced
        assert third.hub._actor_id != first.hub._actor_id
        assert ray.get(_rank0.remote(third, [{"i": 5}])) == [[]]
    assert driver.got == [5]


def test_a_flush_raises_when_the_driver_is_gone(local_ray):
    with channel(_Driver()) as sender:
        _kill(sender.hub)
        with pytest.raises(ray.exceptions.RayActorError):
            sender.flush()


def test_an_item_delivered_just_before_the_channel_closes_is_still_handed_over(local_ray):
    """The controller's last item (train/trainer.py) comes with no flush after it: the channel hands over
    what the hub holds when fit() returns, even while its helper thread idles between takes."""
    driver = _Driver()
    with channel(driver) as sender:
        threading.Event().wait(0.3)  # the helper thread now waits between two empty takes
        sender.deliver({"i": 1})
    assert driver.got == [1]


def test_items_sent_close_together_reach_the_driver_together(local_ray):
    """A small model logging every 10 steps sends ~8 items a second: each put, take and MLflow write is
    CPU taken from training, so items within SEND_EVERY_S of the previous put wait for the next."""
    driver = _Driver()
    with channel(driver) as sender:
        seen = ray.get(_rank0.remote(sender, [{"i": i} for i in range(40)], flush_after=20))
        assert seen == [[], []] and driver.got == list(range(40))
        # The first item went at once; items 2-20 with the first flush, 21-40 with the second.
        assert driver.calls <= 3, driver.calls


@ray.remote(num_cpus=0)
def _paced(sender: Sender) -> None:
    """Items without a flush: one, one at once after it (held), one after the interval, one pushed."""
    sender.send({"i": 0})
    sender.send({"i": 1})
    threading.Event().wait(SEND_EVERY_S + 0.1)
    sender.send({"i": 2})  # goes, and takes item 1 with it
    sender.send({"i": 3})
    sender.push()  # an evaluation's metrics, or a worker about to crash: no wait for the next send


def test_a_held_item_goes_with_the_next_send_after_the_interval_or_with_a_push(local_ray):
    driver = _Driver()
    with channel(driver) as sender:
        ray.get(_paced.remote(sender))
        for _ in range(200):  # the driver takes every 0.1 s; no flush asks for them
            with driver.lock:
                if len(driver.got) == 4:
                    break
            threading.Event().wait(0.05)
        assert driver.got == [0, 1, 2, 3]
