"""Whole training runs on real local Ray (2 workers, 0.5 CPU each), DeepSpeed on CPU, MLflow on sqlite.

- smoke (the session's shared run, conftest): 30 steps learn (the loss falls below chance), eval
  metrics, params, artifacts in one MLflow run; a re-run of the finished run trains nothing and opens
  no second run.
- same seed, same run: one uninterrupted run (2 workers, augmentation, dropout, stochastic depth,
  evaluation on rank 0, local Ray) is the reference for a run interrupted three times on a multi-node
  Ray cluster (a head and two worker nodes, one rank on each): its driver is SIGKILLed (held at step 7
  by the test hook), the same command again resumes from the step-5 checkpoint, there a worker raises
  at step 8 (Ray restarts the group from that checkpoint), and at step 9 the node of rank 1 is lost
  (Ray restarts the group on the surviving node and a replacement). It must end with bit-identical fp32
  parameters and log every step exactly once, with bit-identical losses, gradient norms and
  evaluations. Its steps before the kill also show that two independent runs (other processes, another
  Ray, one node or two) agree.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from scalelab.config import EvalConfig
from scalelab.train.checkpoint import latest_checkpoint, read_run_state
from scalelab.train.faults import (
    FAIL_AT_STEP_ENV,
    FAIL_MARKER_ENV,
    FAIL_RANK_ENV,
    HOLD_AT_STEP_ENV,
    HOLD_MARKER_ENV,
    HOLD_RUN_ENV,
)

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


def test_the_driver_hears_the_step_an_evaluation_runs_at_before_the_evaluation_ends(smoke_run):
    """Rank 0 holds logging steps sent close together (train/progress.py) but pushes them before an
    evaluation: the live view shows the step while the evaluation runs, not only with its results."""
    _, _, heard = smoke_run

    def when(step: int, key: str) -> float:
        return next(t for t, item in heard if item["step"] == step and key in item)

    for step in (15, 30):  # the evaluations (every 15 steps and at the end)
        gap = when(step, "eval/zeroshot/test/top1") - when(step, "train/loss")
        assert gap > 0.05, (step, gap, [(round(t - heard[0][0], 3), i["step"], len(i)) for t, i in heard])


def test_smoke_run_learns_evaluates_and_logs_one_mlflow_run(smoke_run, local_ray):
    from scalelab.train.launch import launch

    cfg, result, _ = smoke_run  # the session's smoke run (conftest), also exported by test_export
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
    executed = _history(client, result.mlflow_run_id, "train/executed_macs")  # the cache's extra forward
    assert executed[-1][1] == pytest.approx(4 * int(params["model.macs_per_sample"]) * 30 * 64, rel=1e-6)
    for key in ("train/samples_per_s", "train/lr", "train/logit_scale", "train/peak_memory_mb",
                "train/time/cache_forward_s", "train/time/optimizer_s"):
        assert _history(client, result.mlflow_run_id, key), key

    top1 = _history(client, result.mlflow_run_id, "eval/zeroshot/test/top1")
    assert [s for s, _ in top1] == [15, 30]  # every 15 steps and at the end
    assert _history(client, result.mlflow_run_id, "eval/zeroshot/robustness_avg/top1")
    assert _history(client, result.mlflow_run_id, "eval/retrieval/i2t_r1")
    assert result.final_metrics["eval/zeroshot/test/top1"] == pytest.approx(top1[-1][1])

    artifacts = {f.path for f in client.list_artifacts(result.mlflow_run_id)}
    nested = {f.path for d in artifacts for f in client.list_artifacts(result.mlflow_run_id, d)}
    assert {"config/experiment.json", "tokenizer/tokenizer.json", "eval/final.json"} <= nested

    # The same command again: the finished run is found, nothing is trained, no second MLflow run.
    again = launch(cfg, verbose=False)
    assert (again.step, again.mlflow_run_id, again.resumed_from) == (30, result.mlflow_run_id, 30)
    assert len(_runs(result.tracking_uri, "smoke")[1]) == 1
    assert len(_history(client, result.mlflow_run_id, "train/loss")) == 6


def _resumable_config(smoke_config, storage: Path, name: str):
    """The smoke run's setup (2 workers, augmentation on, ZeRO-2, rank 0 evaluating) on 12 steps that
    exercise everything a restart must restore: dropout and stochastic depth (RNG), an epoch boundary and
    a mid-epoch data position, a checkpoint at step 5 and evaluations at steps 6 and 12."""
    cfg = smoke_config(storage, {
        "name": name,
        "model": {"overrides": {"text": {"dropout": 0.1}, "image": {"drop_path": 0.1}}},
        "data": {"n_pairs": 256},  # 4 steps per epoch: the run crosses epochs and resumes mid-epoch
        "train": {"steps": 12},
        "run": {"checkpoint_every": 5, "log_every": 1},
    })
    assert cfg.train.num_workers == 2 and cfg.data.augment  # as the smoke run: rows split over ranks, crops
    # One eval set, every 6 steps: the evaluator (rank 0) is part of the run, at a small cost.
    evaluation = EvalConfig(sets={"test": cfg.eval.sets["test"]}, every_steps=6)
    return cfg.model_copy(update={"eval": evaluation})


# Metrics that are functions of the seed (timings and throughput are not).
_EXACT = ("train/loss", "train/grad_norm", "train/logit_scale", "train/samples_seen",
          "eval/zeroshot/test/top1")


def _exact_histories(uri: str, name: str) -> dict[str, list[tuple[int, float]]]:
    client, runs = _runs(uri, name)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return {key: _history(client, runs[0].info.run_id, key) for key in _EXACT}


def _assert_same_run(got, want) -> None:
    """Bit-identical: the final fp32 parameters, and each step logged once with the same values."""
    a, b = _fp32_params(latest_checkpoint(got.run_dir)), _fp32_params(latest_checkpoint(want.run_dir))
    assert a.keys() == b.keys()
    differ = [k for k in b if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} parameters differ, e.g. {differ[:3]}"
    histories = _exact_histories(got.tracking_uri, got.name)
    assert [s for s, _ in histories["train/loss"]] == list(range(1, 13))  # every step exactly once
    assert [s for s, _ in histories["eval/zeroshot/test/top1"]] == [6, 12]
    assert histories == _exact_histories(want.tracking_uri, want.name)


@pytest.fixture(scope="module")
def uninterrupted(smoke_config, tmp_path_factory, local_ray):
    """The reference for the interrupted run below."""
    from scalelab.train.launch import launch

    return launch(_resumable_config(smoke_config, tmp_path_factory.mktemp("steady"), "steady"), verbose=False)


def _placements(console: Path) -> list[dict[int, str]]:
    """Each worker group's node ids by rank, from the run's 'rank 0 on node <id> (<ip>), ...' lines."""
    lines = [line for line in console.read_text().splitlines() if "rank 0 on node " in line]
    return [{int(r): node for r, node in re.findall(r"rank (\d+) on node ([0-9a-f]+)", line)}
            for line in lines]


def _wait(ready, driver: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + 600
    while not ready():
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} within 10 minutes"
        time.sleep(0.2)


def test_driver_kill_worker_failure_and_node_loss_and_the_run_equals_the_uninterrupted_one(
    smoke_config, tmp_path, kill_session, make_cluster, uninterrupted
):
    """On a cluster of a head and two worker nodes (one rank on each): the driver is SIGKILLed at step 7,
    after its step-5 checkpoint; the same command again resumes at step 5; there rank 1 raises at step 8
    (Ray restarts the group from step 5), and at step 9 the node of rank 1 is removed (raylet and workers
    SIGKILLed) and a replacement added: Ray restarts the group on the surviving and the new node, from
    step 5 again. The run ends in its first MLflow run, equal to `uninterrupted` to the last bit: steps
    6-7 ran four times and 8-9 three, each logged once. Last in this module: the cluster replaces the
    session's local Ray while it runs."""
    cfg = _resumable_config(smoke_config, tmp_path / "runs", "killed")
    # Nodes of 2 CPUs and workers of 1.5: one rank per node, room beside it for a decode task. One
    # thread per worker, as the uninterrupted run's 0.5-CPU workers. Two restarts in the second command.
    cfg = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"cpus_per_worker": 1.5, "threads_per_worker": 1}),
        "run": cfg.run.model_copy(update={"max_failures": 3}),
    })
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir = tmp_path / "runs" / "killed"
    console = run_dir / "console.log"  # where the workers' lines go (the terminal shows the live view)
    with make_cluster((2, 2)) as cluster:
        command = [sys.executable, "-m", "scalelab.cli", "train", str(config), "--ray", cluster.address]
        first_log = tmp_path / "first.log"
        driver = subprocess.Popen(command, stdout=first_log.open("w"), stderr=subprocess.STDOUT,
                                  env={**os.environ, HOLD_RUN_ENV: "killed", HOLD_AT_STEP_ENV: "7"},
                                  start_new_session=True)
        _wait(lambda: latest_checkpoint(run_dir) is not None and console.is_file()
              and "step 7/12" in console.read_text(), driver, first_log, "step 7")
        kill_session(driver.pid)  # the driver alone: the cluster stays, the run's workers die with it
        driver.wait(timeout=60)
        assert read_run_state(latest_checkpoint(run_dir)).step == 5
        first = _placements(console)
        assert len(first) == 1 and set(first[0].values()) == {node.node_id for node in cluster.workers}

        failed, held = tmp_path / "failed-once", tmp_path / "held-once"
        second_log = tmp_path / "second.log"
        second = subprocess.Popen(command, stdout=second_log.open("w"), stderr=subprocess.STDOUT, env={
            **os.environ, FAIL_AT_STEP_ENV: "8", FAIL_RANK_ENV: "1", FAIL_MARKER_ENV: str(failed),
            HOLD_RUN_ENV: "killed", HOLD_AT_STEP_ENV: "9", HOLD_MARKER_ENV: str(held)})
        _wait(held.exists, second, second_log, "step 9")
        groups = _placements(console)
        lost = next(node for node in cluster.workers if node.node_id == groups[-1][1])
        cluster.remove_node(lost)
        replacement = cluster.add_node(2)
        assert second.wait(timeout=600) == 0, second_log.read_text()[-3000:]
        groups = _placements(console)

    assert "resuming the interrupted run at step 5/12" in second_log.read_text()
    assert failed.read_text() == "8"  # the worker failure really happened
    # Groups: the first command's; the second's, again after the worker failure, then after the node loss.
    # Ray Train ranks its workers by node, not by the last group's order: compare nodes, not rank -> node.
    assert len(groups) == 4, groups
    assert set(groups[1].values()) == set(groups[2].values()) == set(groups[0].values()), groups
    survivor = next(node for node in groups[0].values() if node != lost.node_id)
    assert set(groups[3].values()) == {survivor, replacement.node_id}
    final = read_run_state(latest_checkpoint(run_dir))
    assert (final.step, final.samples_seen, final.finished) == (12, 12 * 64, True)

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert _runs(uri, "killed")[1][0].info.status == "FINISHED"
    killed = SimpleNamespace(run_dir=run_dir, tracking_uri=uri, name="killed")
    _assert_same_run(killed, uninterrupted)
