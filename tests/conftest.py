"""Shared test setup: offline hubs, no telemetry, CPU DeepSpeed; and the fixtures of the training and
sweep tests: a small synthetic world with a tokenizer, experiment configs on it, a local Ray."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# As `ensure_ray` sets for the local instance it starts (the tests start theirs with ray.init): one
# machine, nothing to preempt, so no preemption-watcher actor per run.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from scalelab.config import ExperimentConfig, deep_merge, validate  # after the env defaults

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run where torch sees a CUDA device and are skipped elsewhere (CI)."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in marked:
        item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory) -> Path:
    """1024 training pairs in 4 shards, small eval sets and 128 retrieval pairs, tokenizer.json."""
    from scalelab.data.synth import generate_world
    from scalelab.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("world") / "smoke"
    generate_world(out, n_pairs=1024, seed=0, image_size=32, samples_per_shard=256, progress=False,
                   eval_per_class=4, retrieval_pairs=128)
    train_tokenizer(out, vocab_size=1000)
    return out


@pytest.fixture(scope="session")
def smoke_config(smoke_world):
    """Factory: experiments/smoke.yaml on the smoke world, storage at the given folder, `overrides`
    (a nested dict) merged in: `smoke_config(tmp_path, {"train": {"steps": 12}})`."""

    def make(storage: Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
        return _smoke_config(smoke_world, storage, overrides or {})

    return make


def _smoke_config(world: Path, storage: Path, overrides: dict[str, Any]) -> ExperimentConfig:
    import yaml

    data = yaml.safe_load((REPO / "experiments" / "smoke.yaml").read_text())
    data["data"]["sources"] = [{"path": str(world)}]
    data["eval"]["sets"] = {name: str(world / "eval" / name) for name in data["eval"]["sets"]}
    data["eval"]["retrieval"] = str(world / "eval" / "retrieval")
    data["run"]["storage"] = str(storage)
    return validate(ExperimentConfig, deep_merge(data, overrides))


# One local Ray for the whole session (started by the first test that needs it): each start costs
# seconds, and its idle workers are reused by later tests' Ray Data tasks. A test that must see Ray
# down (`no_ray`) shuts it; the next test that needs it starts it again.
_RAY_TEMP: list[str] = []


def _ensure_ray() -> None:
    import ray

    from scalelab.train.launch import LOCAL_RAY_ENV

    if ray.is_initialized():
        return
    # What `ensure_ray` sets for the local instance it starts, so that the tests' runs take the path a
    # user's local runs take (no per-fit placement-group cleaner, no Ray Train metrics: ~1 s per fit on
    # 2 cores). The multi-node clusters below run without it, as a real cluster does.
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    os.environ[LOCAL_RAY_ENV] = "1"
    _RAY_TEMP.append(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay short
    ray.init(num_cpus=2, object_store_memory=400_000_000, include_dashboard=False, _temp_dir=_RAY_TEMP[-1],
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})


def _stop_ray() -> None:
    import ray

    from scalelab.train.launch import LOCAL_RAY_ENV

    ray.shutdown()
    os.environ.pop(LOCAL_RAY_ENV, None)
    while _RAY_TEMP:
        shutil.rmtree(_RAY_TEMP.pop(), ignore_errors=True)


@pytest.fixture(scope="session")
def _ray_owner():
    """Shuts the session's Ray down at the end."""
    yield
    _stop_ray()


@pytest.fixture(scope="module")
def local_ray(_ray_owner):
    """A 2-CPU local Ray instance (launch() reuses an initialised Ray)."""
    _ensure_ray()


@pytest.fixture
def no_ray():
    """Ray not initialised in this process (what a fresh `scalelab` command sees)."""
    _stop_ray()


@pytest.fixture(scope="module")
def ray_cluster(request, _ray_owner):
    """The local Ray, for a module that runs its own functions in Ray Train workers: the module is
    pickled by value (workers cannot import test modules: pytest puts tests/ on the driver's path only)."""
    import sys

    from ray import cloudpickle

    _ensure_ray()
    module = sys.modules[request.module.__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)


class LocalCluster:
    """A Ray cluster of separate raylets on this machine (Ray's own `cluster_utils.Cluster`, as Ray's
    tests use it): a head that trains nothing (0 CPUs, as cluster.yaml's head) and worker nodes, each
    with its own resources, that a test can remove (their raylet and workers SIGKILLed) and add."""

    def __init__(self, worker_cpus: tuple[float, ...], dashboard_port: int | None = None) -> None:
        from ray.cluster_utils import Cluster

        self.temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # Ray's socket paths must stay short
        head: dict[str, Any] = {"num_cpus": 0, "object_store_memory": 100_000_000, "temp_dir": self.temp,
                                "include_dashboard": dashboard_port is not None}
        if dashboard_port is not None:
            head.update(dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
        # The head writes its address for `ray.init(address="auto")` under RAY_TMPDIR: there, in this
        # cluster's own folder, so that no other `scalelab` command on the machine finds it.
        os.makedirs(os.path.join(self.temp, "ray"))
        before = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = self.temp
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=head)
        finally:
            if before is None:
                del os.environ["RAY_TMPDIR"]
            else:
                os.environ["RAY_TMPDIR"] = before
        self.workers = [self.add_node(cpus) for cpus in worker_cpus]

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, cpus: float) -> Any:
        return self.cluster.add_node(num_cpus=cpus, object_store_memory=150_000_000, temp_dir=self.temp)

    def remove_node(self, node: Any) -> None:
        """Kill the node's raylet and everything it started, at once (no graceful shutdown)."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def shutdown(self) -> None:
        for node in list(self.workers):
            self.remove_node(node)
        self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)
        shutil.rmtree(self.temp, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(worker_cpus: tuple[float, ...], dashboard_port: int | None = None):
    """`LocalCluster` for a `with` block; the session's own local Ray is stopped first (a process
    talks to one Ray at a time) and started again by the next test that needs it."""
    _stop_ray()
    cluster = LocalCluster(worker_cpus, dashboard_port)
    try:
        yield cluster
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def make_cluster(_ray_owner):
    """`with make_cluster(worker_cpus) as cluster:` a `LocalCluster` (see `local_cluster`)."""
    return local_cluster


@pytest.fixture(scope="module")
def two_node_ray(request, _ray_owner):
    """This process connected to a `LocalCluster` of two 1-CPU worker nodes, for a module that runs its
    own functions in Ray Train workers (pickled by value, as `ray_cluster`)."""
    import sys

    import ray
    from ray import cloudpickle

    module = sys.modules[request.module.__name__]
    with local_cluster((1, 1)) as cluster:
        ray.init(address=cluster.address,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})
        cloudpickle.register_pickle_by_value(module)
        try:
            yield cluster
        finally:
            cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture(scope="session")
def smoke_run(smoke_config, tmp_path_factory, _ray_owner):
    """experiments/smoke.yaml trained once for the session (30 steps, 2 workers, ZeRO-2, every eval):
    the smoke test, the export tests and the eval tests read the same run. (config, TrainResult, what
    the driver heard from rank 0 and when: [(time.monotonic(), item)])."""
    import time

    from scalelab.train.launch import launch

    _ensure_ray()
    cfg = smoke_config(tmp_path_factory.mktemp("smoke_runs"))
    heard: list[tuple[float, dict[str, Any]]] = []
    result = launch(cfg, verbose=False, progress=lambda item: heard.append((time.monotonic(), dict(item))))
    return cfg, result, heard


@pytest.fixture(scope="session")
def kill_session():
    """`kill_session(pid)`: SIGKILL every process of the session `pid` leads (a command started with
    `start_new_session=True`): its local Ray's GCS, raylet and agents and every worker, each of which sits
    in its own process group. Repeated until none is left, so a worker forked during the kill dies too."""
    return _kill_session


def _kill_session(sid: int, timeout: float = 30.0) -> None:
    import signal
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while alive := [p for p in psutil.process_iter() if _live_member(p, sid)]:
        assert time.monotonic() < deadline, f"processes of session {sid} survive SIGKILL: {alive}"
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        time.sleep(0.5)


def _live_member(proc, sid: int) -> bool:
    """`proc` belongs to session `sid` and is not a zombie (dead, waiting to be reaped)."""
    import psutil

    try:
        return os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False
