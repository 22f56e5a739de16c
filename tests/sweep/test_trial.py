"""scalelab.sweep.trial: what a trial tells Tune."""

import queue

from scalelab.sweep.trial import _newest


def test_what_arrived_together_is_one_report_with_the_newest_value_of_each_key():
    """Rank 0's items arrive in bursts (train/progress.py); each Tune report is work for the sweep's
    driver on the cores the trials train on, and Tune needs the newest values only (MLflow has them all)."""
    progress: queue.Queue = queue.Queue()
    for item in ({"step": 20, "train/loss": 3.0, "eval/top1": 0.25}, {"step": 30, "train/loss": 2.5}):
        progress.put(item)
    first = {"step": 10, "train/loss": 3.5, "train/lr": 0.1}
    assert _newest(progress, first) == {"step": 30, "train/loss": 2.5, "train/lr": 0.1, "eval/top1": 0.25}
    assert progress.empty()
    assert _newest(progress, {"step": 40}) == {"step": 40}  # nothing queued: the item as it is
