"""The sweep's live view callbacks, driven the way Tune drives them (no Ray started)."""

from __future__ import annotations

import io
import os
import pickle
import threading
import time

from scalelab.console import Console, LiveView, RunTable
from scalelab.sweep.live import _REFITS, Coalescing, LiveTrials, Refit, failure_reason
from scalelab.sweep.results import SweepState


class _Wrapped(Exception):
    """Like Ray's RayTaskError: the trial's own exception is its `cause`."""

    def __init__(self, text: str, cause: BaseException) -> None:
        super().__init__(text)
        self.cause = cause


class _Trial:
    def __init__(self, name: str, status: str, error: BaseException | None = None) -> None:
        self.name, self.status, self.error = name, status, error

    def __str__(self) -> str:
        return self.name

    def get_pickled_error(self) -> BaseException | None:
        return self.error

    def is_finished(self) -> bool:
        return self.status in ("TERMINATED", "ERROR")


def test_a_failed_trial_is_one_line_with_its_innermost_reason_and_the_log():
    cause = RuntimeError("run 'demo--d1-nano-b64' stopped at step 40: eval set 'test' is empty\nmore detail")
    err = _Wrapped("Traceback (most recent call last):\n  File ...\nray.exceptions.RayTaskError", cause)
    assert failure_reason(_Trial("t", "ERROR", err)) == (
        "RuntimeError: run 'demo--d1-nano-b64' stopped at step 40: eval set 'test' is empty")
    assert failure_reason(_Trial("t", "ERROR")) == "no error recorded"

    out = io.StringIO()
    table = RunTable("eval/zeroshot/test/top1")
    table.row("d1-nano-b64", steps=100, batch=64)
    with LiveView(Console(out), table, interval=3600) as view:
        live = LiveTrials("k", table, view, log_path="/runs/demo/console.log")
        trial = _Trial("d1-nano-b64", "RUNNING")
        live.on_trial_start(0, [trial], trial)
        live.on_trial_result(1, [trial], trial, {"step": 40, "train/loss": 3.2,
                                                 "train/samples_per_s_current": 500.0})
        trial.status, trial.error = "ERROR", err
        live.on_trial_error(2, [trial], trial)
        live.close()
    printed = out.getvalue()
    assert ("[d1-nano-b64] failed: RuntimeError: run 'demo--d1-nano-b64' stopped at step 40: eval set 'test' "
            "is empty; details in /runs/demo/console.log") in printed
    assert table.rows["d1-nano-b64"].state == "ERROR" and table.rows["d1-nano-b64"].step == 40


def test_the_callback_pickles_without_its_view_and_a_copy_elsewhere_does_nothing():
    table = RunTable("m")
    view = LiveView(Console(io.StringIO()), table)
    live = LiveTrials("key2", table, view, None)
    copy = pickle.loads(pickle.dumps(live))  # what Tune does with its callbacks for restore
    live.close()
    trial = _Trial("x", "RUNNING")
    copy.on_trial_result(0, [trial], trial, {"step": 3})  # its view is gone: no error, no row
    assert "x" not in table.rows


def test_coalescing_runs_in_the_background_once_more_for_requests_during_a_run_and_close_drops_pending():
    started, release, runs, nices = threading.Event(), threading.Event(), [], []

    def work() -> None:
        runs.append(threading.current_thread().name)
        nices.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        started.set()
        release.wait(timeout=30)

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    background = Coalescing(work, name="refit-test", nice=5)
    background.request()
    assert started.wait(timeout=30)  # the caller did not wait for it: it is still running
    for _ in range(3):  # three requests while it runs: one more run, not three
        background.request()
    started.clear()
    release.set()
    assert started.wait(timeout=30)
    time.sleep(0.2)
    assert runs == ["refit-test", "refit-test"]
    release.clear()
    started.clear()
    background.request()
    assert started.wait(timeout=30)
    background.request()  # pending when close() comes: dropped
    threading.Timer(0.2, release.set).start()
    background.close()  # returns once the running one ended
    assert len(runs) == 3 and not background._thread.is_alive()
    # the background thread runs niced; the caller's own priority is untouched
    assert set(nices) == {min(mine + 5, 19)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_refit_is_requested_after_each_trial_but_the_last(tmp_path):
    state = SweepState(name="s", tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment_id="1",
                       parent_run_id="p", metric="m", robustness_metric=None, predict_compute=None,
                       trials=[{"name": "a"}, {"name": "b"}])
    refit = pickle.loads(pickle.dumps(Refit(state)))  # Tune keeps pickled copies of its callbacks
    requests: list[str] = []
    served = threading.Event()
    _REFITS[refit.key] = Coalescing(lambda: (requests.append("refit"), served.set()), name="refit-s")
    a, b = _Trial("a", "RUNNING"), _Trial("b", "RUNNING")
    refit.on_trial_complete(1, [a, b], a)  # `b` still runs: the plots are refreshed
    assert served.wait(timeout=30)
    a.status = "TERMINATED"
    refit.on_trial_complete(2, [a, b], b)  # the last one: the final analysis follows, no refit
    time.sleep(0.2)  # (a wrongly requested refit would run now)
    refit.close()
    assert requests == ["refit"] and refit.key not in _REFITS
