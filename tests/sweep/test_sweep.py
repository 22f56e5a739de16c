"""A 3-trial CPU sweep on real local Ray/Tune, DeepSpeed and MLflow, killed mid-way and run again.

One trial is held at its step-4 checkpoint by the test hook (train/faults.py); the driver (and every
process it started) is SIGKILLed once another trial has finished. The same command again must: keep the
finished trial (its MLflow metric history does not grow, its end time does not move: nothing was
retrained), resume the held trial from its checkpoint (its worker says "resumed at step"), run the rest,
and leave exactly 3 child runs under one parent, with the results table, fits and plots on the parent.
Three batch sizes at a fixed number of steps are the fewest trials that show all of it: one finished,
one interrupted, one not yet finished, and three compute values for the frontier fit.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scalelab.cli import main
from scalelab.config import EvalConfig
from scalelab.train.checkpoint import latest_checkpoint, read_run_state
from scalelab.train.faults import HOLD_AT_STEP_ENV, HOLD_RUN_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SWEEP = "grid"
BATCHES = (16, 32, 64)
TRIALS = {f"d256-micro-b{b}" for b in BATCHES}
HELD = "d256-micro-b32"  # held at step 4 of 8 in the first run


def _write_sweep(tmp_path: Path, smoke_config) -> Path:
    base = smoke_config(tmp_path / "unused", {"run": {"log_every": 2, "checkpoint_every": 4}})
    base = base.model_copy(update={"eval": EvalConfig(sets={"test": base.eval.sets["test"]})}).to_dict()
    del base["run"]["storage"]  # the sweep sets it
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": SWEEP, "base": "base.yaml",
        "axes": {"data": [256], "model": ["micro"], "batch": list(BATCHES)},
        "budget": {"kind": "steps", "value": 8},
        "micro_batch": {"size": 16},
        # 0.75: two trials fit on 2 CPUs with room for their decode tasks, so they really run at once
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.75, "max_concurrent_trials": 2},
        "storage": str(tmp_path / "runs"), "robustness_metric": None,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _client(tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scalelab-sweeps")
    return client, experiment


def _children(client, experiment) -> list:
    return client.search_runs([experiment.experiment_id], f"tags.sweep = '{SWEEP}' and tags.trial != ''")


def _mid_run(run_dir: Path) -> bool:
    """The run has a checkpoint, and it is not the final one (the trial has steps left)."""
    latest = latest_checkpoint(run_dir)
    return latest is not None and not read_run_state(latest).finished


def _wait_for_interruptible_point(driver, tmp_path: Path, log: Path) -> None:
    """A trial finished and the held trial waiting at its step-4 checkpoint."""
    deadline = time.monotonic() + 900
    held = tmp_path / "runs" / SWEEP / "trials" / f"{SWEEP}--{HELD}"
    while True:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the sweep did not reach its kill point in 15 minutes"
        # sweep.json is written after the driver created (and migrated) the MLflow store: only then
        # may another process open it.
        if (tmp_path / "runs" / SWEEP / "sweep.json").exists():
            client, experiment = _client(tmp_path)
            if experiment is not None:
                done = [r for r in _children(client, experiment) if r.info.status == "FINISHED"]
                latest = latest_checkpoint(held)
                if done and latest is not None and read_run_state(latest).step == 4:
                    return
        time.sleep(1.0)


def _run_logged(command: list[str], env: dict[str, str], log: Path, kill_session, *, timeout: float) -> int:
    """Run to the end with the output in `log`; on timeout, kill it and everything it started and fail
    with the log's tail (a hung run must say where it hung, also in CI)."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            proc.wait(timeout=60)
            lines = [line for line in log.read_text().splitlines() if "PlacementGroupCleaner" not in line]
            pytest.fail(f"{command[3:]} still running after {timeout:.0f} s; its output ends:\n"
                        + "\n".join(lines[-150:]))


def _compute_line(status: str) -> tuple[float, float, float]:
    """(spent, planned, left) GMACs from `scalelab sweep --status`'s compute line."""
    m = re.search(r"compute: ([\d.e+]+) GMACs spent of ([\d.e+]+) planned \([\d.]+%\), ([\d.e+]+) GMACs left",
                  status)
    assert m, status
    return float(m[1]), float(m[2]), float(m[3])


def test_sweep_killed_midway_resumes_without_rerunning_finished_trials(tmp_path, smoke_config, kill_session,
                                                                       capsys):
    started = time.monotonic()
    sweep_file = _write_sweep(tmp_path, smoke_config)
    command = [sys.executable, "-m", "scalelab.cli", "sweep", str(sweep_file), "--ray", "local"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    held = {**env, HOLD_RUN_ENV: f"{SWEEP}--{HELD}", HOLD_AT_STEP_ENV: "4"}
    log = tmp_path / "first.log"
    with log.open("w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=held,
                                  start_new_session=True)
        try:
            _wait_for_interruptible_point(driver, tmp_path, log)
        finally:  # the driver and everything it started (its local Ray) die at once, no cleanup
            kill_session(driver.pid)
            driver.wait(timeout=60)

    client, experiment = _client(tmp_path)
    before = {r.data.tags["trial"]: r for r in _children(client, experiment)}
    finished_before = {t: r for t, r in before.items() if r.info.status == "FINISHED"}
    trials_dir = tmp_path / "runs" / SWEEP / "trials"
    interrupted = [t for t, r in before.items()
                   if r.info.status == "RUNNING" and _mid_run(trials_dir / f"{SWEEP}--{t}")]
    history = {t: len(client.get_metric_history(r.info.run_id, "train/loss"))
               for t, r in finished_before.items()}
    assert finished_before and HELD in interrupted
    capsys.readouterr()  # --status of the interrupted sweep: compute spent so far and what is left
    assert main(["sweep", str(sweep_file), "--status"]) == 0
    status = capsys.readouterr().out
    spent, planned, left = _compute_line(status)
    assert 0 < spent < planned and left == pytest.approx(planned - spent, rel=1e-3), status

    # What is left of 25 minutes (the rest of the test's 30 needs about a minute).
    second = _run_logged(command, env, tmp_path / "second.log", kill_session,
                         timeout=max(300.0, 1500 - (time.monotonic() - started)))
    out = (tmp_path / "second.log").read_text()
    assert second == 0, out[-4000:]
    assert "resuming the sweep" in out
    raw = (tmp_path / "runs" / SWEEP / "console.log").read_text()  # the workers' own lines, both runs
    assert any(f"[{SWEEP}--{t}] resumed at step" in raw for t in interrupted), raw[-4000:]
    assert "RayTrainWorker" not in out and "TrainingReport" not in out, out[-4000:]  # the terminal: the view
    assert re.search(rf"^{HELD}\s+TERMINATED\s+8/8\s", out, re.M), out[-4000:]

    children = _children(client, experiment)
    assert {r.data.tags["trial"] for r in children} == TRIALS  # 3 children, no duplicates
    assert len(children) == 3
    parents = client.search_runs([experiment.experiment_id], f"tags.`scalelab.sweep_parent` = '{SWEEP}'")
    assert len(parents) == 1
    parent = parents[0]
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"trial_id", "axis.data", "axis.model", "axis.batch"} <= tags.keys()
        assert tags["trial"] == f"d{tags['axis.data']}-{tags['axis.model']}-b{tags['axis.batch']}"
    for trial, run in finished_before.items():  # not retrained: same run, same metric history
        assert client.get_run(run.info.run_id).info.end_time == run.info.end_time
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == history[trial]

    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"results.csv", "fits.json", "sweep.json"} <= artifacts
    assert {"plots/error_vs_compute.png", "plots/loss_curves.png"} <= plots
    assert "fit/frontier/B" in client.get_run(parent.info.run_id).data.metrics
    local = Path(client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path)))
    rows = list(csv.DictReader(local.open()))
    assert {r["trial_id"] for r in rows} == TRIALS and {r["state"] for r in rows} == {"TERMINATED"}
    assert sorted(int(r["samples_seen"]) for r in rows) == [8 * b for b in BATCHES]

    # --status and plot read what is on storage (no Ray): in this process
    capsys.readouterr()
    assert main(["sweep", str(sweep_file), "--status"]) == 0
    status = capsys.readouterr().out
    assert "3/3 finished" in status
    (macs,) = {int(r.data.params["model.macs_per_sample"]) for r in children}  # one preset: one value
    executed = sum(4 * macs * 8 * b for b in BATCHES)
    assert _compute_line(status) == pytest.approx((executed / 1e9, executed / 1e9, 0.0), rel=1e-3), status
    assert main(["plot", str(tmp_path / "runs" / SWEEP)]) == 0
    analysis = tmp_path / "runs" / SWEEP / "analysis"
    assert (analysis / "fits.json").is_file()
    assert (analysis / "plots" / "error_vs_compute.png").stat().st_size > 0
