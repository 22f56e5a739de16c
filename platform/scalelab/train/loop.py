"""The Ray Train worker: the training loop, one step after another (each step's details live elsewhere).

`train_worker(plan_dict)` runs in every worker process. The driver (`launch`) decided everything a
worker must not decide alone and sent it as a `WorkerPlan` dict; the first line makes it typed again.
Every rank calls the collectives (the data stream's epoch agreement, steps, evaluation, reports,
checkpoints) at the same steps; rank 0 alone sends metrics to the driver (which stores them in MLflow)
and prints the progress line.

    plan → task (engine, seeds) → start or resume → data stream, reporter, evaluator →
    for each step: batch → task.step → count non-finite skips → log → evaluate → report / checkpoint

A deterministic error (evaluation, data, too many non-finite steps) is raised as `RunStopped` on every
rank at the same step and ends the run without a Ray retry (train/failures.py).
"""

from __future__ import annotations

import functools
import resource
from dataclasses import dataclass
from typing import Any

import ray.train
import torch

from scalelab import storage
from scalelab.train.checkpoint import RankState, RunState, read_run_state
from scalelab.train.compute import executed_macs, training_macs
from scalelab.train.evaluator import Evaluator
from scalelab.train.failures import Failure, RunStopped, write_failure
from scalelab.train.faults import maybe_inject_fault
from scalelab.train.plan import PROGRESS_KEY, WorkerPlan
from scalelab.train.reporter import Reporter
from scalelab.train.step import NonFiniteGuard, NonFiniteRunError
from scalelab.train.stream import DataStream, quiet_data_progress
from scalelab.train.task import make_task
from scalelab.train.timeline import mark

__all__ = ["starting_checkpoint", "train_worker"]


@dataclass
class _Worker:
    """Who this process is: its rank among `world` and the plan it follows."""

    plan: WorkerPlan
    rank: int
    world: int


def train_worker(plan_dict: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker (see the module docstring)."""
    mark("worker_entered")
    plan = WorkerPlan.from_dict(plan_dict)
    sender = plan_dict.get(PROGRESS_KEY)
    ctx = ray.train.get_context()
    me = _Worker(plan, ctx.get_world_rank(), ctx.get_world_size())
    cfg = plan.experiment
    torch.set_num_threads(cfg.train.threads_per_worker or max(1, round(cfg.train.cpus_per_worker + 0.49)))
    quiet_data_progress()
    task = make_task(cfg, me.rank, me.world)
    mark("engine_built", rank=me.rank)
    run, mine = _start_or_resume(me, task)
    reporter = Reporter(plan, me.rank, run, sender)
    mark("reporter_ready", rank=me.rank)
    reporter.say(_placement(me.world))
    if run.step > 0:
        reporter.say(f"resumed at step {run.step} ({run.samples_seen} samples seen)")
    if run.step >= plan.steps:  # finished before (the driver says so); nothing left to do
        return
    try:
        _train(me, task, run, mine, reporter)
    except RunStopped as stop:  # every rank is here at the same step: end without a retry
        if me.rank == 0:
            write_failure(plan.run_dir, Failure(stop.reason, stop.kind, run.step))
        reporter.say(f"stopped at step {run.step}: {stop.reason}")
    except BaseException:
        reporter.push()
        raise
    mark("train_done", rank=me.rank)
    reporter.close()  # not on a crash: Ray restarts the group from the last checkpoint, flushed by then


def _placement(world: int) -> str:
    """Where this worker group runs, 'rank 0 on node <id> (<ip>), rank 1 on ...', gathered from every
    rank (one collective per start): on a cluster the log says which nodes a run used, before and after
    Ray restarted it on a replacement node."""
    import torch.distributed as dist

    here = f"node {ray.get_runtime_context().get_node_id()} ({ray.util.get_node_ip_address()})"
    where: list[Any] = [here]
    if world > 1 and dist.is_initialized():
        where = [None] * world
        dist.all_gather_object(where, here)
    return ", ".join(f"rank {rank} on {node}" for rank, node in enumerate(where))


def _train(me: _Worker, task: Any, run: RunState, mine: RankState, reporter: Reporter) -> None:
    plan, cfg = me.plan, me.plan.experiment
    stream = DataStream(cfg, me.rank, me.world, mine)
    evaluator = Evaluator(cfg, me.rank)
    guard = NonFiniteGuard(cfg.train.max_skipped_steps)
    if run.nonfinite:
        guard.load_state_dict(run.nonfinite)
    mark("stream_ready", rank=me.rank)
    while run.step < plan.steps:
        maybe_inject_fault(run.step, me.rank, cfg.name)
        metrics = task.step(stream.next(), run.step)
        run.advance(cfg.train.global_batch)
        mark("step", rank=me.rank, step=run.step)  # a skipped step advances too: its batch was consumed
        last = run.step == plan.steps
        stop = _observe(guard, metrics, run.step)
        metrics.update({"train/samples_seen": run.samples_seen, "train/epoch": stream.epoch,
                        "train/compute_macs": training_macs(plan.macs_per_sample, run.samples_seen),
                        "train/executed_macs": executed_macs(plan.macs_per_sample, run.samples_seen,
                                                             cfg.task),
                        "train/peak_memory_mb": _peak_memory_mb(), **guard.metrics()})
        logged = run.step % cfg.run.log_every == 0 or last or stop is not None
        if logged:
            metrics.update(stream.skipped_totals())
            reporter.log(metrics, run.step)
        if stop is not None:  # the skip flags are agreed, so every rank stops at this step
            raise RunStopped(str(stop), kind="non_finite")
        run.nonfinite = guard.state_dict()
        if evaluator.due(run.step):
            reporter.push()
        evaluated = evaluator.maybe_run(run.step, task)
        reporter.log_eval(evaluated, run.step, last)
        if last:
            run.final_metrics, run.finished = evaluated or {}, True
        if last or (cfg.run.checkpoint_every and run.step % cfg.run.checkpoint_every == 0):
            save = functools.partial(task.save, run=run, mine=stream.state())
            reporter.report(run, metrics, evaluated, save=save)
            mark("checkpoint_reported", rank=me.rank, step=run.step)


def _start_or_resume(me: _Worker, task: Any) -> tuple[RunState, RankState]:
    """A new run's states, or the ones of the checkpoint to start from (loaded into the task)."""
    checkpoint = starting_checkpoint(ray.train.get_checkpoint(), me.plan.resume_from)
    if checkpoint is None:
        cfg = me.plan.experiment
        return RunState(world_size=me.world, mlflow_run_id=me.plan.mlflow_run_id,
                        config=cfg.to_dict()), RankState()
    with checkpoint.as_directory() as directory:
        run, mine = task.load(directory)
    run.config = me.plan.experiment.to_dict()  # allowed changes (steps, eval, run settings) take effect
    return run, mine


def starting_checkpoint(recorded: Any, chosen: str | None) -> Any:
    """The driver's choice (`resume.decide_resume`), unless Ray restarted this worker group after a
    failure inside this `fit()`: then Ray's recorded checkpoint is the newer one. (A driver killed right
    after a checkpoint leaves Ray's own record behind: the driver's choice covers that.)"""
    if chosen is None:
        return recorded
    if recorded is not None:
        with recorded.as_directory() as directory:
            if read_run_state(directory).step >= read_run_state(chosen).step:
                return recorded
    return _ray_checkpoint(chosen)


def _ray_checkpoint(location: str) -> Any:
    """A Ray checkpoint of a folder on storage: on a URI it names the folder on its filesystem, and
    `as_directory()` downloads it for loading (as Ray does with the checkpoints it records)."""
    if not storage.is_uri(location):
        return ray.train.Checkpoint.from_directory(location)
    filesystem, path = storage.resolve(location)
    return ray.train.Checkpoint(path, filesystem=filesystem)


def _observe(guard: NonFiniteGuard, metrics: dict[str, Any], step: int) -> NonFiniteRunError | None:
    """Count a skipped (non-finite) step; the error when too many came in a row, to raise after logging."""
    try:
        guard.observe(metrics["train/skipped"] == 1.0, step=step)
    except NonFiniteRunError as err:
        return err
    return None


def _peak_memory_mb() -> float:
    # is_initialized first: is_available() asks NVML (loading its library) on every call, ~0.2 ms a step
    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
