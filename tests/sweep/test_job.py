"""`ray job submit` of a sweep to a real multi-node Ray cluster on this machine, started as `ray up` starts
one: `ray start --head` (0 CPUs, with the dashboard's job server) and two worker nodes joining it with
`ray start --address` (2 CPUs each, their own raylets). The sweep's trial trains on 2 workers of 1.5 CPUs:
one on each worker node.

The job runs in a temporary copy of its --working-dir, so a relative `storage` must resolve against
`SCALELAB_ROOT` from the job's runtime env: the results and the MLflow store land there, and nothing is
written into the working dir copy. Without `SCALELAB_ROOT` the job is refused before any training. A job
stopped mid-trial (`ray job stop`, after the trial's step-4 checkpoint) and submitted again resumes: the
trial continues from step 4 and the sweep ends with one parent and one trial run in MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from scalelab.config import EvalConfig
from scalelab.sweep.runner import PARENT_TAG
from scalelab.train.faults import HOLD_AT_STEP_ENV, HOLD_MARKER_ENV, HOLD_RUN_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SWEEP = "jobsweep"
TRIAL = "d512-micro-b32"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SCALELAB_ROOT")}
    env["RAY_AUTH_MODE"] = "disabled"  # Ray 2.59+ turns on token auth for local clusters
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's entrypoint runs `scalelab`
    return env


def _stop_head(temp: str) -> None:
    """End the processes of this head only (each carries its temp dir in its command line), not other
    Ray instances on the machine, as `ray stop` would."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp in part for part in proc.info["cmdline"] or ()):
                mine.append(proc)
    procs = {p.pid: p for p in mine}
    for p in mine:
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in p.children(recursive=True)})
    # SIGKILL at once: nothing of a test's head needs a clean exit, and some of its processes take the
    # whole grace period of a SIGTERM.
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(list(procs.values()), timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head (no CPUs; the dashboard's job server) and two 2-CPU worker nodes, on free ports and
    127.0.0.1; yields the dashboard's address and the head's temp dir."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    gcs, dashboard, client, agent, agent_grpc, metrics, env_agent = _free_ports(7)
    head = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "0",
            "--object-store-memory", "100000000", "--include-dashboard", "true", "--dashboard-host",
            "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
            *_node_ports(agent, agent_grpc, metrics, env_agent), "--temp-dir", temp, "--disable-usage-stats"]
    try:
        _ray_start(head)
        for _ in range(2):
            # One log monitor per machine (the head's): the nodes share its session folder, and each
            # monitor would forward every worker line again.
            _ray_start([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "2", "--object-store-memory", "150000000", "--include-log-monitor",
                        "false", *_node_ports(*_free_ports(4)), "--disable-usage-stats"])
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_server(address)
        yield address, Path(temp)
    finally:
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _node_ports(agent: int, agent_grpc: int, metrics: int, env_agent: int) -> list[str]:
    """A node's own agent and metrics ports (several nodes on one machine must not share them)."""
    return ["--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(env_agent)]


def _ray_start(cmd: list[str]) -> None:
    started = subprocess.run(cmd, env=_ray_env(), capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr


def _wait_for_job_server(address: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the dashboard's job server at {address} did not come up"
        time.sleep(0.5)


@pytest.fixture
def project(tmp_path: Path, smoke_config) -> Path:
    """The job's working dir: sweep.yaml (one trial, relative storage) and its base experiment."""
    base = smoke_config(tmp_path / "unused", {"eval": {"every_steps": None},
                                              "run": {"log_every": 2, "checkpoint_every": 4}})
    base = base.model_copy(update={"eval": EvalConfig(sets={"test": base.eval.sets["test"]})}).to_dict()
    del base["run"]["storage"]  # the sweep sets it
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": SWEEP, "base": "base.yaml",
        "axes": {"data": [512], "model": ["micro"], "batch": [32]},
        "budget": {"kind": "samples", "value": 256},  # 8 steps
        "micro_batch": {"size": 16},
        # One worker on each 2-CPU node, with room beside it for a decode task.
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1.5, "max_concurrent_trials": 1},
        "storage": "runs",  # relative: resolved against SCALELAB_ROOT inside the job
        "robustness_metric": None,
    }
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return folder


def _submit(address: str, project: Path, env_vars: dict[str, str], *,
            wait: bool = True) -> tuple[str, subprocess.CompletedProcess]:
    job_id = f"scalelab-test-{uuid.uuid4().hex[:12]}"
    runtime_env = {"env_vars": {"DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true",
                                "HF_HUB_OFFLINE": "1", **env_vars}}
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(project),
           "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env),
           *([] if wait else ["--no-wait"]), "--", "scalelab", "sweep", "sweep.yaml"]
    done = subprocess.run(cmd, env=_ray_env(), capture_output=True, text=True, timeout=540)
    return job_id, done


def _job(address: str, job_id: str) -> tuple[str, str]:
    """The job's final status and its logs (`ray job logs`)."""
    from ray.job_submission import JobSubmissionClient

    status = JobSubmissionClient(address).get_job_status(job_id)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=_ray_env(),
                          capture_output=True, text=True, timeout=60)
    assert logs.returncode == 0, logs.stderr
    return str(status.value if hasattr(status, "value") else status), logs.stdout


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_sweep_job_stopped_and_submitted_again_resumes_under_scalelab_root(ray_head, project, tmp_path):
    address, temp = ray_head
    root = tmp_path / "root"
    root.mkdir()
    before = _files(project)
    # First job: the trial holds at step 6 (after its step-4 checkpoint) until the job is stopped.
    held = tmp_path / "held"
    hold = {HOLD_RUN_ENV: f"{SWEEP}--{TRIAL}", HOLD_AT_STEP_ENV: "6", HOLD_MARKER_ENV: str(held)}
    first, submitted = _submit(address, project, {"SCALELAB_ROOT": str(root), **hold}, wait=False)
    assert submitted.returncode == 0, submitted.stderr
    _wait_for(lambda: held.exists(), address, first)
    stopped = subprocess.run([RAY, "job", "stop", "--address", address, first], env=_ray_env(),
                             capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert _job(address, first)[0] == "STOPPED"

    job_id, done = _submit(address, project, {"SCALELAB_ROOT": str(root)})
    status, logs = _job(address, job_id)
    assert done.returncode == 0 and status == "SUCCEEDED", f"{status}\n{done.stderr[-3000:]}\n{logs[-6000:]}"

    runs = root / "runs"
    assert (runs / SWEEP / "sweep.json").is_file()
    assert (runs / SWEEP / "tune").is_dir()
    trial_dir = runs / SWEEP / "trials" / f"{SWEEP}--{TRIAL}"
    assert trial_dir.is_dir()
    # The sweep's log: each job's section starts with its command line.
    jobs = (runs / SWEEP / "console.log").read_text().split("===== scalelab sweep sweep.yaml")[1:]
    assert len(jobs) == 2 and "resumed at step 4" in jobs[1], jobs[-1][-3000:]
    for job in jobs:  # each job's worker group: rank 0 and rank 1 on two different nodes
        nodes = re.findall(r"rank 0 on node ([0-9a-f]+) .*, rank 1 on node ([0-9a-f]+) ", job)
        assert len(set(nodes)) == 1 and len(set(nodes[0])) == 2, nodes
    state = json.loads((runs / SWEEP / "sweep.json").read_text())

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scalelab-sweeps")
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert len(client.search_runs([experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{SWEEP}'")) == 1
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 1, [c.data.tags for c in children]
    assert children[0].info.status == "FINISHED"
    seen = client.get_metric_history(children[0].info.run_id, "train/samples_seen")
    assert sorted(m.step for m in seen) == list(range(2, 9, 2)) and max(m.value for m in seen) == 256

    # Nothing written into the job's working dir: neither the project nor the copies Ray ran it in.
    assert _files(project) == before
    _assert_copies_untouched(temp, before)


def _wait_for(ready, address: str, job_id: str, timeout: float = 480) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client, deadline = JobSubmissionClient(address), time.monotonic() + timeout
    while not ready():
        status = client.get_job_status(job_id)
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), _job(address, job_id)
        assert time.monotonic() < deadline, _job(address, job_id)[1][-4000:]
        time.sleep(1.0)


def _assert_copies_untouched(temp: Path, expected: set[str]) -> None:
    copies = [p for p in temp.glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert copies, f"no working dir copy under {temp}"
    for copy in copies:
        assert _files(copy) == expected, copy


def test_relative_storage_without_root_is_refused(ray_head, project):
    address, temp = ray_head
    before = _files(project)
    job_id, done = _submit(address, project, {})
    status, logs = _job(address, job_id)
    assert done.returncode != 0 and status == "FAILED", f"{status}\n{logs[-3000:]}"
    assert "storage='runs' is relative, and this is a Ray job running in a temporary working dir" in logs
    assert "set SCALELAB_ROOT in the job's runtime env" in logs
    assert f"[{SWEEP}]" not in logs  # refused before the sweep planned its trials or opened a run
    assert _files(project) == before
    _assert_copies_untouched(temp, before)
