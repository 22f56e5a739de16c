"""A training run whose `run.storage` is an S3 bucket (moto's S3-protocol server on 127.0.0.1), driven
through the command line as a user would, with `--ray local`:

- killed: the driver is SIGKILLed with its local Ray and workers while held at step 4 (after its step-3
  checkpoint landed in the bucket); the same command again finds that checkpoint in the bucket,
  resumes from it and finishes all 8 steps in the same MLflow run (store: a local sqlite file, named
  with run.tracking_uri, as an object store cannot hold one), whose artifacts are in the bucket;
- export: `scalelab export s3://…/<run>` writes the model of the newest checkpoint in the bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from s3_server import s3_server
from scalelab.config import EvalConfig
from scalelab.train.checkpoint import latest_checkpoint, read_run_state
from scalelab.train.faults import HOLD_AT_STEP_ENV, HOLD_RUN_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAME = "on-s3"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


def _config(smoke_config, storage: str, tracking_uri: str):
    cfg = smoke_config(storage, {
        "name": NAME,
        "data": {"n_pairs": 256},
        "train": {"steps": 8},
        "run": {"checkpoint_every": 3, "log_every": 1, "tracking_uri": tracking_uri},
    })
    return cfg.model_copy(update={"eval": EvalConfig(sets={"test": cfg.eval.sets["test"]})})


def test_a_run_on_s3_resumes_after_a_kill_from_the_bucket_and_exports_from_it(
    smoke_config, tmp_path, kill_session, s3
):
    import mlflow

    storage = s3.uri("runs")
    db = tmp_path / "mlflow.db"
    cfg = _config(smoke_config, storage, f"sqlite:///{db}")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    command = [sys.executable, "-m", "scalelab.cli", "train", str(config), "--ray", "local"]
    env = {**os.environ, "RAY_TMPDIR": "/tmp"}
    log = (tmp_path / "first.log").open("w")
    held = {**env, HOLD_RUN_ENV: NAME, HOLD_AT_STEP_ENV: "4"}
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=held, cwd=tmp_path,
                              start_new_session=True)
    run_dir = f"{storage}/{NAME}"
    progress = tmp_path / "scalelab-logs" / NAME / "console.log"  # a URI run logs to a local file
    deadline = time.monotonic() + 600
    while (latest_checkpoint(run_dir) is None or not progress.is_file()
           or "step 4/8" not in progress.read_text()):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no step 4 within 10 minutes"
        time.sleep(0.5)
    kill_session(driver.pid)
    driver.wait(timeout=60)
    assert read_run_state(latest_checkpoint(run_dir)).step == 3
    assert any(k.startswith(f"runs/{NAME}/step_00000003/deepspeed/") for k in s3.keys(f"runs/{NAME}/"))

    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the interrupted run at step 3/8" in second.stdout
    final = read_run_state(latest_checkpoint(run_dir))
    assert (final.step, final.samples_seen, final.finished) == (8, 8 * 64, True)

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("scalelab")
    assert experiment.artifact_location == f"s3://{s3.bucket}/runs/mlartifacts"
    runs = client.search_runs([experiment.experiment_id], f"tags.`scalelab.run_key` = '{NAME}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    losses = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 9))  # the replayed step 4 logged once
    artifacts = s3.keys("runs/mlartifacts/")
    for name in ("config/experiment.json", "tokenizer/tokenizer.json", "eval/final.json"):
        assert any(k.endswith(f"/artifacts/{name}") for k in artifacts), (name, artifacts)

    out = tmp_path / "exported"
    export = subprocess.run([sys.executable, "-m", "scalelab.cli", "export", run_dir, str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    meta = json.loads((out / "config.json").read_text())
    assert (meta["step"], meta["samples_seen"]) == (8, 8 * 64)
    assert meta["source"] == f"{run_dir}/step_00000008"
    assert (out / "model.pt").is_file()
