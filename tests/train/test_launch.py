"""Whole training runs on real local Ray (2 workers, 0.5 CPU each), DeepSpeed on CPU, MLflow on sqlite.

- smoke: ~30 steps learn (the loss falls below chance), eval metrics, params, artifacts in one MLflow run;
  a re-run of the finished run trains nothing and opens no second run.
- fault injection: a worker raises mid-run → Ray restarts the group from the last checkpoint → the final
  fp32 parameters equal an uninterrupted run's (tolerance 0: the resumed run replays the same data,
  augmentation and dropout, and gloo's reductions are deterministic), samples_seen is exact, one run.
- driver SIGKILL (with every process it started) → the same command again resumes and finishes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from scalelab.config import EvalConfig
from scalelab.train.checkpoint import latest_checkpoint, read_run_state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _runs(uri: str, name: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("scalelab")
    return client, client.search_runs([experiment.experiment_id], f"tags.`scalelab.run_key` = '{name}'")


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _fp32_params(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "deepspeed"), tag="state")


def test_smoke_run_learns_evaluates_and_logs_one_mlflow_run(smoke_config, tmp_path, local_ray):
    from scalelab.train.launch import launch

    cfg = smoke_config(tmp_path)
    result = launch(cfg, verbose=False)
    assert (result.step, result.samples_seen) == (30, 30 * 64)

    client, runs = _runs(result.tracking_uri, "smoke")
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.preset"] == "micro" and params["train.global_batch"] == "64"
    assert params["train.zero_stage"] == "2" and int(params["model.macs_per_sample"]) > 0
    assert "run.tracking_uri" not in params
    assert "scalelab.version" in run.data.tags

    losses = _history(client, result.mlflow_run_id, "train/loss")
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25, 30]
    chance = math.log(64)  # a model that has learnt nothing scores ln(B)
    assert losses[-1][1] < chance - 0.05 and losses[-1][1] < losses[0][1] - 0.05, losses
    seen = _history(client, result.mlflow_run_id, "train/samples_seen")
    assert seen == [(s, float(s * 64)) for s in (5, 10, 15, 20, 25, 30)]
    macs = _history(client, result.mlflow_run_id, "train/compute_macs")
    assert macs[-1][1] == pytest.approx(3 * int(params["model.macs_per_sample"]) * 30 * 64, rel=1e-6)
    for key in ("train/samples_per_s", "train/lr", "train/logit_scale", "train/peak_memory_mb",
                "train/time/cache_forward_s", "train/time/optimizer_s"):
        assert _history(client, result.mlflow_run_id, key), key

    top1 = _history(client, result.mlflow_run_id, "eval/zeroshot/test/top1")
    assert [s for s, _ in top1] == [15, 30]  # every 15 steps and at the end
    assert _history(client, result.mlflow_run_id, "eval/zeroshot/robustness_avg/top1")
    assert _history(client, result.mlflow_run_id, "eval/retrieval/retrieval/i2t_r1")
    assert result.final_metrics["eval/zeroshot/test/top1"] == pytest.approx(top1[-1][1])

    artifacts = {f.path for f in client.list_artifacts(result.mlflow_run_id)}
    nested = {f.path for d in artifacts for f in client.list_artifacts(result.mlflow_run_id, d)}
    assert {"config/experiment.json", "tokenizer/tokenizer.json", "eval/final.json"} <= nested

    # The same command again: the finished run is found, nothing is trained, no second MLflow run.
    again = launch(cfg, verbose=False)
    assert (again.step, again.mlflow_run_id, again.resumed_from) == (30, result.mlflow_run_id, 30)
    assert len(_runs(result.tracking_uri, "smoke")[1]) == 1
    assert len(_history(client, result.mlflow_run_id, "train/loss")) == 6


def _fault_config(smoke_config, storage: Path, name: str):
    cfg = smoke_config(storage, {
        "name": name,
        "model": {"overrides": {"text": {"dropout": 0.1}, "image": {"drop_path": 0.1}}},  # RNG must resume
        "data": {"n_pairs": 256},  # 4 steps per epoch: the run crosses epochs and resumes mid-epoch
        "train": {"steps": 12},
        "run": {"checkpoint_every": 5, "log_every": 1},
    })
    return cfg.model_copy(update={"eval": EvalConfig()})


def test_worker_failure_restarts_from_checkpoint_and_matches_uninterrupted_run(
    smoke_config, tmp_path, local_ray, monkeypatch
):
    from scalelab.train.launch import launch

    reference = launch(_fault_config(smoke_config, tmp_path, "steady"), verbose=False)

    marker = tmp_path / "failed-once"
    monkeypatch.setenv("SCALELAB_FAIL_AT_STEP", "8")  # after the step-5 checkpoint, in epoch 2
    monkeypatch.setenv("SCALELAB_FAIL_RANK", "1")
    monkeypatch.setenv("SCALELAB_FAIL_MARKER", str(marker))
    faulty = launch(_fault_config(smoke_config, tmp_path, "faulty"), verbose=False)

    assert marker.read_text() == "8"  # the failure really happened
    assert (faulty.step, faulty.samples_seen) == (12, 12 * 64) == (reference.step, reference.samples_seen)
    want = _fp32_params(latest_checkpoint(reference.run_dir))
    got = _fp32_params(latest_checkpoint(faulty.run_dir))
    assert want.keys() == got.keys()
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"max |p_faulty - p_uninterrupted| = {diff:.3g}")
    assert diff == 0.0

    client, runs = _runs(faulty.tracking_uri, "faulty")
    assert [r.info.run_id for r in runs] == [faulty.mlflow_run_id]
    seen = dict(_history(client, faulty.mlflow_run_id, "train/samples_seen"))
    assert seen[12] == 12 * 64
    loss = dict(_history(client, faulty.mlflow_run_id, "train/loss"))
    ref_loss = dict(_history(client, reference.mlflow_run_id, "train/loss"))
    assert loss == ref_loss  # replayed steps 6-8 logged the same values at the same steps


def test_cached_data_trains_exactly_like_the_ray_data_stream(smoke_config, tmp_path, local_ray):
    """data.cache in the training loop: same rows, same order across epochs → identical loss history."""
    from scalelab.train.launch import launch

    def run(name: str, cache: bool):
        data = {"n_pairs": 256, "augment": False, "cache": cache}
        cfg = smoke_config(tmp_path, {"name": name, "data": data, "train": {"steps": 10, "num_workers": 1},
                                      "run": {"log_every": 1, "checkpoint_every": 10}})
        return launch(cfg.model_copy(update={"eval": EvalConfig()}), verbose=False)

    plain, cached = run("streamed", False), run("cached", True)
    client, _ = _runs(plain.tracking_uri, "streamed")
    want = _history(client, plain.mlflow_run_id, "train/loss")
    got = _history(client, cached.mlflow_run_id, "train/loss")
    assert len(want) == 10 and [e for e, _ in want] == list(range(1, 11))  # 2.5 epochs of 4 steps
    assert got == want


def test_driver_sigkill_then_same_command_resumes(smoke_world, smoke_config, tmp_path, kill_session):
    cfg = smoke_config(tmp_path / "runs", {"name": "killed", "train": {"steps": 24},
                                           "run": {"checkpoint_every": 4}})
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(cfg.model_copy(update={"eval": EvalConfig()}).to_dict()))
    command = [sys.executable, "-m", "scalelab.cli", "train", str(config), "--ray", "local"]
    env = {**os.environ, "RAY_TMPDIR": "/tmp"}
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.monotonic() + 600
    while latest_checkpoint(run_dir) is None or read_run_state(latest_checkpoint(run_dir)).step < 8:
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 8 within 10 minutes"
        time.sleep(0.5)
    # The whole machine-side of the run dies at once: driver, local Ray, workers (SIGKILL, no cleanup).
    kill_session(driver.pid)
    driver.wait(timeout=60)
    killed_at = read_run_state(latest_checkpoint(run_dir)).step
    assert 8 <= killed_at < 24

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming the interrupted run at step {killed_at}/24" in second.stdout
    final = read_run_state(latest_checkpoint(run_dir))
    assert (final.step, final.samples_seen, final.finished) == (24, 24 * 64, True)

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client, runs = _runs(uri, "killed")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    seen = _history(client, runs[0].info.run_id, "train/samples_seen")
    assert seen[-1] == (24, 24.0 * 64)
    # Resumed, not restarted: a restart from step 0 would log the steps up to the checkpoint twice
    # (steps after it may legitimately be logged twice: trained before the kill, and again after).
    early = [s for s, _ in seen if s <= killed_at]
    assert early and len(early) == len(set(early)), seen
