"""Deterministic errors end a run once (no Ray retry), leave a FAILED MLflow run with the reason, keep the
checkpoint; fixing the cause and running the same command resumes. Real Ray Train, DeepSpeed, MLflow."""

from __future__ import annotations

import shutil

import pytest
from mlflow.tracking import MlflowClient

from scalelab.train.failures import Failure, read_failure, write_failure
from scalelab.train.launch import RunFailed, launch


def test_failure_file_round_trip_and_clear(tmp_path):
    from scalelab.train.failures import clear_failure

    assert read_failure(tmp_path) is None
    write_failure(tmp_path / "run", Failure("evaluation failed: x", "eval", 4))
    assert read_failure(tmp_path / "run") == Failure("evaluation failed: x", "eval", 4)
    clear_failure(tmp_path / "run")
    assert read_failure(tmp_path / "run") is None


@pytest.mark.slow
def test_eval_error_fails_once_then_the_fixed_run_resumes(smoke_world, smoke_config, tmp_path, local_ray):
    # A PNG cut after its header passes preflight (which opens every eval image's header, not its pixel
    # data) and fails at the first evaluation, on rank 0 only.
    evalset = tmp_path / "evalset"
    shutil.copytree(smoke_world / "eval" / "test", evalset)
    victim = sorted(evalset.glob("*/*.png"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    cfg = smoke_config(tmp_path / "runs", {
        "name": "evalfail",
        "train": {"steps": 6},
        "eval": {"sets": {"test": str(evalset)}, "shifted": [], "retrieval": None, "every_steps": 4},
        "run": {"checkpoint_every": 2, "log_every": 1, "max_failures": 2},
    })
    with pytest.raises(RunFailed) as err:  # a retried error would end in Ray's TrainingFailedError instead
        launch(cfg, verbose=False)
    message = str(err.value)
    assert "stopped at step 4: evaluation failed: OSError: image file is truncated" in message
    assert "step_00000002" in message and "run the same command to resume" in message
    assert "\n" not in message
    assert read_failure(tmp_path / "runs" / "evalfail").kind == "eval"

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("scalelab").experiment_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["scalelab.failure"].startswith("evaluation failed: OSError")
    assert run.data.tags["scalelab.failed_at_step"] == "4"

    victim.write_bytes(good)  # the fix; the same command resumes from the kept checkpoint
    result = launch(cfg, verbose=False)
    assert result.resumed_from == 2 and result.step == 6
    assert read_failure(tmp_path / "runs" / "evalfail") is None
    assert result.final_metrics["eval/zeroshot/test/top1"] >= 0.0
    again = client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED" and result.mlflow_run_id == run.info.run_id


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_the_run_stops_once(smoke_config, tmp_path, local_ray):
    # lr 1e30 blows the weights up after the first update: every later loss is NaN/inf.
    cfg = smoke_config(tmp_path / "runs", {
        "name": "nan", "optim": {"lr": 1.0e30, "warmup_steps": 0}, "train": {"steps": 8,
                                                                             "max_skipped_steps": 2},
        "eval": {"sets": {}, "shifted": [], "retrieval": None},
        "run": {"checkpoint_every": 100, "log_every": 1, "max_failures": 2},
    })
    with pytest.raises(RunFailed, match="consecutive training step") as err:
        launch(cfg, verbose=False)
    failure = read_failure(tmp_path / "runs" / "nan")
    assert failure.kind == "non_finite" and "train.max_skipped_steps=2" in str(err.value)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("scalelab").experiment_id)
    skipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/skipped")}
    total = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/skipped_steps")}
    # Three skipped steps in a row end the run at the third (2 allowed); each logged step is there once.
    last = failure.step
    assert [skipped[s] for s in (last - 2, last - 1, last)] == [1.0, 1.0, 1.0]
    assert total[last] == sum(skipped.values()) >= 3
    assert run.info.status == "FAILED"
    assert run.data.tags["scalelab.failure_kind"] == "non_finite"
