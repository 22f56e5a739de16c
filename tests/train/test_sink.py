"""scalelab.train.sink: the driver stores rank 0's items in the run, against a real sqlite store."""

import json
import math
from pathlib import Path

import mlflow
import pytest

from scalelab import tracking
from scalelab.train.sink import RunSink


@pytest.fixture
def store(tmp_path):
    """(tracking_uri, experiment_id, client) for a fresh sqlite store under tmp_path."""
    uri = tracking.default_tracking_uri(tmp_path)
    exp_id = tracking.get_or_create_experiment("exp", uri, tracking.default_artifact_root(uri, tmp_path))
    return uri, exp_id, mlflow.MlflowClient(tracking_uri=uri)


def _steps(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _item(run_id, step, t=1_000, **metrics):
    return {"run": run_id, "step": step, "t": t, "metrics": metrics}


def test_items_are_stored_with_their_time_then_shown_and_other_runs_items_dropped(store):
    uri, exp_id, client = store
    handle = tracking.start_or_resume_run(uri, exp_id, run_name="r")
    shown = []
    sink = RunSink(handle, shown.append)
    items = [_item(handle.run_id, s, t=1_000 + s, **{"train/loss": 1.0 / s, "train/lr": math.nan})
             for s in (1, 2)]
    items.insert(1, _item("another-run", 9, **{"train/loss": 5.0}))  # a late item of the previous run
    items.append({"run": handle.run_id, "dict": {"eval/top1": 0.75}, "file": "eval/final.json"})
    items += [{"run": handle.run_id, "placement_group": "pg-1"},
              {"run": "another-run", "placement_group": "pg-0"}]
    assert sink(items) == ([], None)
    assert sink.placement_groups == ["pg-1"]  # kept for launch, not stored in the run
    assert _steps(client, handle.run_id, "train/loss") == [(1, 1.0), (2, 0.5)]
    assert [m.timestamp for m in client.get_metric_history(handle.run_id, "train/loss")] == [1_001, 1_002]
    assert math.isnan(_steps(client, handle.run_id, "train/lr")[0][1])
    assert [s["step"] for s in shown] == [1, 2] and shown[1]["train/loss"] == 0.5
    local = mlflow.artifacts.download_artifacts(run_id=handle.run_id, artifact_path="eval/final.json",
                                                tracking_uri=uri)
    assert json.loads(Path(local).read_text()) == {"eval/top1": 0.75}


def test_a_resumed_run_stores_each_replayed_step_once_and_notes_a_loss_that_differs(store):
    """The steps after the checkpoint come again: those the run holds are dropped (per key), and a
    replayed loss that is not the logged one bit for bit comes back as a note."""
    uri, exp_id, client = store
    first = tracking.start_or_resume_run(uri, exp_id, run_name="r")
    for step in (1, 2, 3):  # the interrupted attempt: eval logged at step 2 only
        first.log_metrics({"train/loss": 5.0 - step, "eval/top1": 0.2 if step == 2 else None}, step)

    sink = RunSink(tracking.start_or_resume_run(uri, exp_id, run_name="r"))  # resumed at step 1
    notes, error = sink([_item(first.run_id, 2, **{"train/loss": 3.0, "eval/top1": 0.25}),  # the same
                         _item(first.run_id, 3, **{"train/loss": 2.0000001, "eval/top1": 0.3}),  # not
                         _item(first.run_id, 4, **{"train/loss": 1.0, "eval/top1": 0.4})])
    assert error is None
    assert len(notes) == 1 and "replayed step 3 gives loss 2.0000001, the run logged 2.0" in notes[0]
    assert _steps(client, first.run_id, "train/loss") == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]
    assert _steps(client, first.run_id, "eval/top1") == [(2, 0.2), (3, 0.3), (4, 0.4)]

    # A worker group Ray restarts within the run replays the steps after ITS checkpoint (step 3): what
    # this sink stored counts as held too.
    notes, _ = sink([_item(first.run_id, 4, **{"train/loss": 1.5}),
                     _item(first.run_id, 5, **{"train/loss": 0.5})])
    assert len(notes) == 1 and "replayed step 4 gives loss 1.5, the run logged 1.0" in notes[0]
    assert _steps(client, first.run_id, "train/loss") == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0), (5, 0.5)]


def test_the_steps_of_one_batch_are_stored_in_one_write(store, monkeypatch):
    """Rank 0 sends several logging steps at once (train/progress.py): one MLflow write for all of them
    costs the store a third of one write per step; a step the batch holds twice (an attempt's item and
    its replay by a restarted group) is stored once, and a differing replay noted."""
    uri, exp_id, client = store
    handle = tracking.start_or_resume_run(uri, exp_id, run_name="r")
    writes = []
    real = handle.client.log_batch
    monkeypatch.setattr(handle.client, "log_batch", lambda *a, **k: (writes.append(k), real(*a, **k))[1])
    sink = RunSink(handle)
    items = [_item(handle.run_id, s, **{"train/loss": 10.0 - s, "train/lr": 0.1}) for s in (1, 2, 3)]
    notes, error = sink([*items, _item(handle.run_id, 3, **{"train/loss": 6.5})])
    assert error is None and len(writes) == 1 and len(writes[0]["metrics"]) == 6
    assert _steps(client, handle.run_id, "train/loss") == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert len(notes) == 1 and "replayed step 3 gives loss 6.5, the run logged 7.0" in notes[0]
