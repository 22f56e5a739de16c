"""The driver side of `scalelab train`: checks, Ray, the MLflow run, and one `TorchTrainer.fit()`.

`launch(cfg)` is the unit a sweep trial runs. Order matters: the config is checked (paths, model/data
agreement, resume compatibility) before Ray starts, so a bad config costs nothing; the MLflow run is
created (or found again by its run-key tag) by the driver, so a restarted worker group, a re-run
command or a resumed sweep trial all log into the same run; workers get its id, the checkpoint to start
from (`resume.decide_resume`, decided once) and the MACs per sample in their `WorkerPlan`.

Everything persistent sits under `run.storage`: `<name>/step_*` checkpoints (Ray Train's storage),
`mlflow.db` and `mlartifacts/` (the default local MLflow store). A storage URI (`s3://…`) holds the
checkpoints and `mlartifacts/`; the MLflow store is then named by the user (`tracking.store_required`).
Running the same command again finds the checkpoints (Ray restores its checkpoint bookkeeping from
`<storage>/<name>`) and continues.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scalelab import console, storage
from scalelab.config import ExperimentConfig, flatten, resolve_paths
from scalelab.storage import Location
from scalelab.train.checkpoint import RunState, latest_checkpoint, read_run_state
from scalelab.train.failures import RunFailed, clear_failure, read_failure
from scalelab.train.faults import FAULT_ENV
from scalelab.train.plan import PROGRESS_KEY, WorkerPlan
from scalelab.train.preflight import (
    check_experiment,
    check_resources,
    local_capacity,
    refuse_short_resources,
    starts_local_ray,
)
from scalelab.train.resume import decide_resume, run_dir
from scalelab.train.timeline import TIMELINE_ENV, mark

__all__ = ["RunFailed", "TrainResult", "ensure_ray", "launch", "preflight", "release_ray", "worker_env"]

# The storage endpoint (an S3-protocol server of one's own) travels with the workers; keys never do:
# they would show in Ray's runtime env, and workers take them from their own environment or role.
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION",
                 "AWS_DEFAULT_REGION")
_PASSTHROUGH_ENV = (*FAULT_ENV, TIMELINE_ENV, "HF_HUB_OFFLINE", "MLFLOW_DISABLE_TELEMETRY", *_ENDPOINT_ENV)
# Never logged as params: a tracking URI may carry a password (postgresql://user:pw@host/db).
_UNLOGGED_PARAMS = ("run.tracking_uri",)
_POLL_ENV, _POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"
_START_TIMEOUT_ENV, _START_TIMEOUT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "1800"
LOCAL_RAY_ENV = "SCALELAB_LOCAL_RAY"  # set by ensure_ray for the local instance it starts


@dataclass
class TrainResult:
    """What a finished `launch` leaves: where the run is, and its final numbers."""

    name: str
    run_dir: Location  # a Path, or a URI on a storage URI
    mlflow_run_id: str
    tracking_uri: str
    step: int
    samples_seen: int
    resumed_from: int | None
    final_metrics: dict[str, float] = field(default_factory=dict)


def launch(cfg: ExperimentConfig, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
           run_key: tuple[str, str] | None = None, verbose: bool = True,
           ray_address: str | None = None, callbacks: list[Any] | None = None,
           progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train `cfg` on Ray Train workers; resume its latest checkpoint if the run exists.

    `parent_run_id`/`tags`/`run_key` let a sweep nest the run under its parent and find it by trial id.
    `ray_address`: see `ensure_ray` (ignored when Ray is already initialised in this process).
    `callbacks`: Ray Train callbacks.
    `progress`: called in this process with rank 0's metrics of every logging step and evaluation
    (`train.progress`: the live view, a sweep trial's reports to Tune).
    `verbose`: say what happens (resume, done) on the active `console`.
    Raises ConfigError before starting anything when the config cannot run.
    """
    mark("launch")
    cfg = preflight(cfg, ray_address)
    resume = decide_resume(cfg)  # the one decision: fresh, resume from X, finished (or ConfigError)
    say = console.current().say if verbose else (lambda *_: None)
    previous = resume.state
    if resume.kind == "finished" and previous is not None and (done := _finished_run(cfg, run_key)):
        # Its MLflow run stays as it is, end time included: a resumed sweep re-visits a trial that
        # finished just before the kill, before Tune recorded it.
        say(f"[{cfg.name}] already finished ({previous.step} steps); nothing to do")
        return _result(cfg, done[0], done[1], previous, previous.step)
    if resume.kind != "fresh":
        say(f"[{cfg.name}] resuming {resume.describe(cfg.train.steps)}")
    handle, uri = _mlflow_run(cfg, parent_run_id, tags, run_key)
    if previous is not None and previous.mlflow_run_id not in (None, handle.run_id):
        say(f"[{cfg.name}] note: the checkpoint names MLflow run {previous.mlflow_run_id}; "
            f"logging to {handle.run_id}")
    if resume.kind == "finished" and previous is not None:  # killed after its last checkpoint
        say(f"[{cfg.name}] finished ({previous.step} steps); its MLflow run is marked FINISHED now")
        handle.finish("FINISHED")
        return _result(cfg, handle.run_id, uri, previous, previous.step)
    mark("mlflow_run")
    started_local = ensure_ray(ray_address)
    mark("ray")
    _check_ray_resources(cfg, started_local, say)
    clear_failure(run_dir(cfg))
    plan = WorkerPlan(cfg, handle.run_id, uri, _macs_per_sample(cfg),
                      str(resume.checkpoint) if resume.checkpoint else None)
    from scalelab.train.progress import channel
    from scalelab.train.sink import RunSink
    from scalelab.train.trainer import remove_leftovers

    sink = RunSink(handle, progress)
    try:
        with channel(sink) as sender:
            _fit(plan, callbacks or [], sender)
    except KeyboardInterrupt:
        handle.finish("KILLED")
        raise
    except BaseException:
        handle.finish("FAILED")
        raise
    finally:
        remove_leftovers(sink.placement_groups)  # a controller that died left its CPUs held
    mark("fit_returned")
    _raise_if_stopped(cfg, handle)
    handle.finish("FINISHED")
    final = read_run_state(latest_checkpoint(run_dir(cfg)))
    result = _result(cfg, handle.run_id, uri, final, previous.step if previous else None)
    say(f"[{cfg.name}] done: {final.step} steps, {final.samples_seen} samples; "
        f"in {storage.describe(result.run_dir)}")
    mark("launch_returned")
    return result


def preflight(cfg: ExperimentConfig, ray_address: str | None = None) -> ExperimentConfig:
    """`cfg` with its paths resolved, once it passed every check that needs no Ray (paths, model/data
    agreement, eval folders; this machine's CPUs when a local Ray would start): ConfigError otherwise."""
    from scalelab.data.labelled import resolve_num_classes

    cfg = resolve_paths(cfg)
    cfg = cfg.model_copy(update={"data": resolve_num_classes(cfg.data)})  # task classify: from the data
    check_experiment(cfg)
    if starts_local_ray(ray_address) and not _ray_initialized():
        refuse_short_resources(cfg, local_capacity(), "this machine")
    return cfg


def _raise_if_stopped(cfg: ExperimentConfig, handle: Any) -> None:
    """A run the workers ended on a deterministic error (train/failures.py): FAILED, reason tagged."""
    failure = read_failure(run_dir(cfg))
    if failure is None:
        return
    handle.set_tags({"scalelab.failure": failure.reason[:4000], "scalelab.failure_kind": failure.kind,
                     "scalelab.failed_at_step": str(failure.step)})
    handle.finish("FAILED")
    latest = latest_checkpoint(run_dir(cfg))
    kept = (f"its last checkpoint {latest} is kept: fix the cause and run the same command to resume"
            if latest else "no checkpoint was written yet")
    raise RunFailed(f"run {cfg.name!r} stopped at step {failure.step}: {failure.reason} ({kept})")


def _ray_initialized() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _check_ray_resources(cfg: ExperimentConfig, started_local: bool, say: Any) -> None:
    """What the run reserves against what Ray has: refused on a local instance (nothing will add
    CPUs); on a cluster, a warning with the numbers (an autoscaler may still add nodes)."""
    import ray

    capacity = {k: float(v) for k, v in ray.cluster_resources().items()}
    if started_local:
        refuse_short_resources(cfg, capacity, "the local Ray instance")
        return
    for line in check_resources(cfg, capacity, "the Ray cluster (now)"):
        say(f"[{cfg.name}] warning: {line}; the run waits until the cluster has them")


def _result(
    cfg: ExperimentConfig, run_id: str, uri: str, state: RunState, resumed: int | None
) -> TrainResult:
    return TrainResult(cfg.name, run_dir(cfg), run_id, uri, state.step, state.samples_seen,
                       resumed, dict(state.final_metrics))


def _finished_run(cfg: ExperimentConfig, run_key: tuple[str, str] | None) -> tuple[str, str] | None:
    """(run id, tracking URI) of this run's MLflow run when it is already FINISHED."""
    from scalelab.tracking import RUN_KEY_TAG, finished_run, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.run.tracking_uri, cfg.run.storage)
    key, value = run_key or (RUN_KEY_TAG, cfg.name)
    run_id = finished_run(uri, cfg.run.mlflow_experiment, key, value)
    return (run_id, uri) if run_id else None


def _mlflow_run(cfg: ExperimentConfig, parent_run_id: str | None, tags: dict[str, str] | None,
                run_key: tuple[str, str] | None) -> tuple[Any, str]:
    from scalelab.models import get_spec, preset_stats
    from scalelab.tracking import (
        code_version,
        default_artifact_root,
        get_or_create_experiment,
        resolve_tracking_uri,
        start_or_resume_run,
    )

    storage = cfg.run.storage
    uri = resolve_tracking_uri(cfg.run.tracking_uri, storage)
    artifacts = default_artifact_root(uri, storage)
    experiment = get_or_create_experiment(cfg.run.mlflow_experiment, uri, artifacts)
    spec = get_spec(cfg.model.preset, **cfg.model.overrides)
    stats = preset_stats(spec)
    all_tags = {**code_version(), "scalelab.preset": cfg.model.preset, **(tags or {})}
    handle = start_or_resume_run(uri, experiment, run_name=cfg.name, tags=all_tags, resume_tag=run_key,
                                 parent_run_id=parent_run_id)
    flat = {k: v for k, v in flatten(cfg.to_dict()).items() if k not in _UNLOGGED_PARAMS}
    flat.update({"model.params": stats.params, "model.macs_per_sample": _macs_per_sample(cfg)})
    _log_params_allowing_changes(handle, flat)
    handle.log_dict({**cfg.to_dict(), "resolved_model": spec.to_dict()}, "config/experiment.json")
    from scalelab.data.tokenizer import tokenizer_path

    if cfg.task == "contrastive":  # a classify run reads no caption and needs no tokenizer
        handle.log_artifact(tokenizer_path(cfg.data), "tokenizer")
    return handle, uri


def _log_params_allowing_changes(handle: Any, flat: dict[str, Any]) -> None:
    """Params are immutable in MLflow; a resumable change (e.g. more steps) is recorded as a tag."""
    existing = handle.client.get_run(handle.run_id).data.params
    changed = {k: v for k, v in flat.items() if k in existing and existing[k] != str(v)}
    handle.log_params({k: v for k, v in flat.items() if k not in changed})
    if changed:
        handle.set_tags({f"resumed_with.{k}": str(v) for k, v in changed.items()})


def worker_env(cfg: ExperimentConfig) -> dict[str, str]:
    """Environment of the training workers: CPU DeepSpeed when there is no GPU, thread counts, hooks."""
    env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
    threads = cfg.train.threads_per_worker or max(1, round(cfg.train.cpus_per_worker + 0.49))
    env["OMP_NUM_THREADS"] = str(threads)
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # scalelab never calls torch.compile. DeepSpeed's ZeRO imports its Muon optimizer module on every
    # `initialize` and first backward (to recognise Muon), and that module's `torch.compile` decorators
    # import torch's compiler stack: 1.3 s of a trial's 1.4 s engine build on 2 cores. With TorchDynamo
    # disabled the decorators are no-ops (0.09 s). A user's own setting wins.
    env["TORCHDYNAMO_DISABLE"] = os.environ.get("TORCHDYNAMO_DISABLE", "1")
    return env


def _macs_per_sample(cfg: ExperimentConfig) -> int:
    """Forward MACs of one sample: image + text tower (contrastive); image tower + head (classify)."""
    from scalelab.models import get_spec, preset_stats

    spec = get_spec(cfg.model.preset, **cfg.model.overrides)
    stats = preset_stats(spec)
    if cfg.task == "classify" and cfg.data.labels is not None and cfg.data.labels.num_classes:
        return stats.image_macs + spec.embed_dim * cfg.data.labels.num_classes
    return stats.macs_per_sample


def _fit(plan: WorkerPlan, callbacks: list[Any], sender: Any) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from scalelab.train.loop import train_worker
    from scalelab.train.trainer import PlacementGroupRecord, trainer_class

    cfg = plan.experiment
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    # Ray Train's controller collects a worker's report when it polls the workers (every 2 s by
    # default), and a worker's next report waits until the previous one is collected: a run reporting
    # more often than every 2 s would stall up to 2 s per report (a 12-step run logging every step took
    # 48 s instead of 27 s). The poll is a small actor call; the variable reaches the controller
    # through Ray Train's own propagation from this process.
    os.environ.setdefault(_POLL_ENV, _POLL_S)
    # A worker group that waits for resources (nodes booting, a lost node being replaced, CPUs another
    # trial's decode tasks hold) gives up after Ray Train's 60 s and retries, logging a start-up
    # "failure" with a traceback each time: let it wait instead.
    os.environ.setdefault(_START_TIMEOUT_ENV, _START_TIMEOUT_S)
    # Ray restores its own checkpoint bookkeeping from `<storage>/<name>` when it finds it, but a driver
    # killed between writing a checkpoint and recording it leaves a checkpoint Ray does not know: the
    # plan names the newest complete one on storage (Train V2 has no resume_from_checkpoint).
    trainer = trainer_class(local=os.environ.get(LOCAL_RAY_ENV) == "1")(
        train_worker,
        train_loop_config={**plan.to_dict(), PROGRESS_KEY: sender},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.run.storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(cfg)},
            callbacks=[*callbacks, PlacementGroupRecord(plan.mlflow_run_id, sender)],
        ),
    )
    return trainer.fit()


def ensure_ray(address: str | None = None) -> bool:
    """Initialise Ray in this process unless it already is; True when it started a local instance.

    `address` None: `RAY_ADDRESS` if set, else the cluster running on this machine (`ray start`), else
    a new local instance. "local": always a new local instance, with a modest object store (Ray's
    default takes ~30% of RAM). Anything else is passed to `ray.init(address=...)`.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "local"):
        ray.init(address=address)
        _OWNED.append(address)
        return False
    if address is None:
        try:
            ray.init(address="auto")
            _OWNED.append("auto")
            return False
        except ConnectionError:
            pass
    # The processes Ray starts inherit this environment. A local instance is one machine that nothing
    # drains or preempts, so Ray Train's preemption watcher (one more actor process per run, which on
    # 2 cores costs seconds of start-up) has nothing to watch. Its Prometheus metrics have no reader
    # (no dashboard): they cost a sweep trial ~0.5 s on 2 cores. `LOCAL_RAY_ENV` tells launch, in whichever
    # process of this instance it runs (a sweep's trial actor), to leave out the per-fit placement-group
    # cleaner (train/trainer.py).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    os.environ[LOCAL_RAY_ENV] = "1"
    ray.init(address="local", object_store_memory=1_000_000_000, include_dashboard=False)
    _OWNED.append("local")
    return True


_OWNED: list[str] = []  # what `ensure_ray` connected this process to (release_ray undoes it)


def release_ray() -> None:
    """Disconnect (a local instance: stop) what `ensure_ray` started. A command calls it before it
    ends, so the workers' last lines, which Ray prints at shutdown, still reach the command's log."""
    if not _OWNED:
        return
    import ray

    _OWNED.clear()
    os.environ.pop(LOCAL_RAY_ENV, None)
    ray.shutdown()
