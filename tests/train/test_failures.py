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
    # An eval image that cannot be decoded passes preflight (which reads the folder layout, templates and
    # class names, not every image's bytes) and fails at the first evaluation, on rank 0 only.
    evalset = tmp_path / "evalset"
    shutil.copytree(smoke_world / "eval" / "test", evalset)
    victim = sorted(evalset.glob("*/*.png"))[0]
    good = victim.read_bytes()
    victim.write_bytes(b"not an image")
    cfg = smoke_config(tmp_path / "runs", {
        "name": "evalfail",
        "train": {"steps": 6},
        "eval": {"sets": {"test": str(evalset)}, "shifted": [], "retrieval": None, "every_steps": 4},
        "run": {"checkpoint_every": 2, "log_every": 1, "max_failures": 2},
    })
    with pytest.raises(RunFailed) as err:  # a retried error would end in Ray's TrainingFailedError instead
        launch(cfg, verbose=False)
    message = str(err.value)
    assert "stopped at step 4: evaluation failed: UnidentifiedImageError" in message
    assert "step_00000002" in message and "run the same command to resume" in message
    assert "\n" not in message
    assert read_failure(tmp_path / "runs" / "evalfail").kind == "eval"

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("scalelab").experiment_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["scalelab.failure"].startswith("evaluation failed: UnidentifiedImageError")
    assert run.data.tags["scalelab.failed_at_step"] == "4"

    victim.write_bytes(good)  # the fix; the same command resumes from the kept checkpoint
    result = launch(cfg, verbose=False)
    assert result.resumed_from == 2 and result.step == 6
    assert read_failure(tmp_path / "runs" / "evalfail") is None
    assert result.final_metrics["eval/zeroshot/test/top1"] >= 0.0
    again = client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED" and result.mlflow_run_id == run.info.run_id
