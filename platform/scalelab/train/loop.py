"""The Ray Train worker: engine, data stream, cached steps, evaluation, checkpoints, metrics.

`train_worker(config)` runs in every worker process. `config` is the dict the driver built
(`launch.worker_config`); the first line turns it into the typed `ExperimentConfig`. Rank 0 alone
logs to MLflow (the run was created by the driver; its id comes in the dict) and prints the progress
line the driver shows. Every rank calls the collectives (steps, checkpoints, `ray.train.report`,
ZeRO-3 gathers) equally often.

Epoch ends are agreed on: each rank reads its own share of the epoch order and drops its own bad rows,
so one rank may run out of full batches a step before another. Before each step the ranks all-reduce
"I have a batch" (MIN); if any rank has none, all move to the next epoch together.

Fault injection for tests: with `SCALELAB_FAIL_AT_STEP=k` in the worker environment, rank
`SCALELAB_FAIL_RANK` (default 0) raises once when it reaches step k, leaving the marker file
`SCALELAB_FAIL_MARKER` so the restarted worker group runs on.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from scalelab.config import ExperimentConfig, validate
from scalelab.data.pipeline import (
    build_dataset,
    decode_subset,
    iter_cached_epoch,
    iter_train_batches,
    tokenizer_path,
)
from scalelab.train.checkpoint import (
    RankState,
    RunState,
    checkpoint_name,
    load_checkpoint,
    read_run_state,
    save_checkpoint,
)
from scalelab.train.compute import training_macs
from scalelab.train.ds_config import batch_geometry
from scalelab.train.engine import build_engine, zero_stage
from scalelab.train.failures import Failure, RunStopped, write_failure
from scalelab.train.step import NonFiniteGuard, NonFiniteRunError, train_step

__all__ = ["FAIL_AT_STEP_ENV", "FAIL_MARKER_ENV", "FAIL_RANK_ENV", "train_worker"]

FAIL_AT_STEP_ENV = "SCALELAB_FAIL_AT_STEP"
FAIL_RANK_ENV = "SCALELAB_FAIL_RANK"
FAIL_MARKER_ENV = "SCALELAB_FAIL_MARKER"


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker (see the module docstring)."""
    cfg = validate(ExperimentConfig, config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.threads_per_worker or max(1, round(cfg.train.cpus_per_worker + 0.49)))
    _quiet_data_progress()

    from scalelab.models import create_model

    torch.manual_seed(cfg.train.seed)  # identical initial parameters on every rank
    engine, _ = build_engine(create_model(cfg.model.preset, **cfg.model.overrides), cfg, world_size=world)
    run = RunState(world_size=world, mlflow_run_id=config.get("mlflow_run_id"), config=cfg.to_dict())
    mine = RankState()
    torch.manual_seed(cfg.train.seed * 7919 + 1 + rank)  # dropout noise differs between ranks
    checkpoint = _newest(ray.train.get_checkpoint(), config.get("resume_from"))
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            run, mine = load_checkpoint(engine, directory, rank, world)
        _restore_rng(mine)
        run.config = cfg.to_dict()  # allowed changes (steps, eval, run settings) take effect
    reporter = _Reporter(cfg, config, run) if rank == 0 else None
    if reporter and checkpoint is not None:
        reporter.say(f"resumed at step {run.step} ({run.samples_seen} samples seen)")
    if run.step >= cfg.train.steps:  # finished before (the driver says so); nothing left to do
        return
    try:
        _train(cfg, engine, run, mine, rank, world, reporter, config)
    except RunStopped as stop:  # every rank is here at the same step: end without a retry (failures.py)
        if rank == 0:
            write_failure(Path(cfg.run.storage) / cfg.name, Failure(stop.reason, stop.kind, run.step))
            if reporter:
                reporter.say(f"stopped at step {run.step}: {stop.reason}")


def _newest(recorded: Any, on_storage: str | None) -> Any:
    """Ray's latest recorded checkpoint of this run, or the newest complete one on storage (named by the
    driver) when that is newer: a driver killed right after a checkpoint leaves Ray's record behind."""
    if on_storage is None:
        return recorded
    if recorded is not None:
        with recorded.as_directory() as directory:
            if read_run_state(directory).step >= read_run_state(on_storage).step:
                return recorded
    return ray.train.Checkpoint.from_directory(on_storage)


def _train(cfg: ExperimentConfig, engine: Any, run: RunState, mine: RankState, rank: int, world: int,
           reporter: _Reporter | None, config: dict[str, Any]) -> None:
    stream = _Stream(cfg, rank, world, mine)
    evaluator = _Evaluator(cfg) if rank == 0 and (cfg.eval.sets or cfg.eval.retrieval) else None
    every_ckpt, every_eval = cfg.run.checkpoint_every, cfg.eval.every_steps
    per_step = cfg.train.global_batch
    guard = NonFiniteGuard(cfg.train.max_skipped_steps)
    if run.nonfinite:
        guard.load_state_dict(run.nonfinite)
    while run.step < cfg.train.steps:
        _maybe_fail(run.step, rank)
        batch = stream.next()
        metrics = train_step(engine, batch.images, batch.tokens, cfg, step=run.step)
        run.step += 1  # a skipped step advances too: its batch was consumed, a resume must not replay it
        run.samples_seen += per_step
        last = run.step == cfg.train.steps
        stop = _observe(guard, metrics, run.step)
        metrics.update({"train/samples_seen": run.samples_seen, "train/epoch": stream.epoch,
                        "train/compute_macs": training_macs(config["macs_per_sample"], run.samples_seen),
                        "train/peak_memory_mb": _peak_memory_mb(), **guard.metrics()})
        logged = run.step % cfg.run.log_every == 0 or last or stop is not None
        if logged:
            metrics.update(stream.skipped_totals())
            if reporter:
                reporter.log(metrics, run.step)
        if stop is not None:  # the skip flags are agreed, so every rank stops at this step
            raise RunStopped(str(stop), kind="non_finite")
        run.nonfinite = guard.state_dict()
        evaluated = None
        if last or (every_eval and run.step % every_eval == 0):
            evaluated = _agreed(_evaluate(engine, evaluator, cfg))
            if reporter:
                reporter.log_eval(evaluated, run.step, last)
            if last:
                run.final_metrics = evaluated or {}
        if last or (every_ckpt and run.step % every_ckpt == 0):
            run.finished = last
            _report(run, metrics, evaluated, checkpoint=(engine, stream.state(), rank))
        elif logged:
            _report(run, metrics, evaluated)


def _observe(guard: NonFiniteGuard, metrics: dict[str, Any], step: int) -> NonFiniteRunError | None:
    """Count a skipped (non-finite) step; the error when too many came in a row, to raise after logging."""
    try:
        guard.observe(metrics["train/skipped"] == 1.0, step=step)
    except NonFiniteRunError as err:
        return err
    return None


def _agreed(evaluated: dict[str, float] | BaseException | None) -> dict[str, float] | None:
    """Rank 0's evaluation, or `RunStopped` on every rank when it failed: a broken eval set fails the
    same way after a restart, and the other ranks must stop at this step too, not wait in a collective."""
    failed = isinstance(evaluated, BaseException)
    if _all_ranks_true(not failed):
        return evaluated  # type: ignore[return-value]
    reason = f"evaluation failed: {type(evaluated).__name__}: {evaluated}" if failed else "evaluation failed"
    raise RunStopped(reason.splitlines()[0], kind="eval")


def _report(run: RunState, metrics: dict[str, Any], evaluated: dict[str, float] | None,
            checkpoint: tuple[Any, RankState, int] | None = None) -> None:
    """`ray.train.report` (a barrier: every rank calls it at the same steps) with rank 0's metrics —
    what a sweep's live table shows — and, at checkpoint steps, every rank's share of the checkpoint
    written to a local folder, which Ray merges on storage."""
    report = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k.startswith("train/")}
    report.update({"step": run.step, "samples_seen": run.samples_seen, **(evaluated or {})})
    if checkpoint is None:
        ray.train.report(report)
        return
    engine, state, rank = checkpoint
    with tempfile.TemporaryDirectory(prefix="scalelab-ckpt-") as tmp:
        save_checkpoint(engine, tmp, run, state, rank)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(run.step))


# --------------------------------------------------------------------------- data
class _Stream:
    """This rank's batches across epochs, with the epoch switch agreed by all ranks."""

    def __init__(self, cfg: ExperimentConfig, rank: int, world: int, state: RankState) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.batch = batch_geometry(cfg.train, world).per_rank_batch
        self.epoch = state.epoch
        self._carried = dict(state.skipped)  # counts of earlier epochs / before the restart
        self._cached: Any = None
        self._open(state.epoch_samples)

    def _open(self, start: int) -> None:
        data = self.cfg.data
        if data.cache:  # decoded once per worker; every epoch then reorders it in memory
            if self._cached is None:
                self._cached = decode_subset(data)
            rows = iter_cached_epoch(self._cached, data, self.epoch, rank=self.rank, world_size=self.world)
            self._it = iter_train_batches(rows, self.batch, start_sample=start)
            return
        ds = build_dataset(data, epoch=self.epoch, train=True, rank=self.rank, world_size=self.world)
        self._it = iter_train_batches(ds, self.batch, start_sample=start)

    def next(self) -> Any:
        for attempt in range(2):
            try:
                batch = next(self._it)
            except StopIteration:
                batch = None
            if _all_ranks_true(batch is not None):
                return batch
            if attempt:  # agreed by all ranks: every rank stops here
                raise RunStopped(
                    f"epoch {self.epoch} gives some rank no full batch of {self.batch} valid samples "
                    f"(bad samples so far: {self._skipped() or 'none'}): data.n_pairs="
                    f"{self.cfg.data.n_pairs} is too small for train.global_batch="
                    f"{self.cfg.train.global_batch} on {self.world} workers", kind="data")
            self._carried = self._skipped()
            self.epoch += 1
            self._open(0)
        raise AssertionError("unreachable")

    def _skipped(self) -> dict[str, int]:
        out = dict(self._carried)
        for reason, n in self._it.skipped.items():
            out[reason] = out.get(reason, 0) + n
        return out

    def state(self) -> RankState:
        return RankState(epoch=self.epoch, epoch_samples=self._it.samples_seen, skipped=self._skipped(),
                         torch_rng=torch.get_rng_state(),
                         cuda_rng=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)

    def skipped_totals(self) -> dict[str, int]:
        """Bad rows by reason over all ranks and the whole run (collective)."""
        gathered: list[dict[str, int]] = [{} for _ in range(self.world)]
        if self.world > 1:
            dist.all_gather_object(gathered, self._skipped())
        else:
            gathered = [self._skipped()]
        total: dict[str, int] = {}
        for part in gathered:
            for reason, n in part.items():
                total[reason] = total.get(reason, 0) + n
        return {f"data/skipped/{reason}": n for reason, n in sorted(total.items())}


def _all_ranks_true(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _quiet_data_progress() -> None:
    # Every epoch starts a Ray Data execution per worker; its progress bars would drown the progress line.
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def _restore_rng(state: RankState) -> None:
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)
    if state.cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state.cuda_rng)


# --------------------------------------------------------------------------- evaluation
class _Evaluator:
    """Rank 0's fp32 copy of the model and the tokenizer, for zero-shot evaluation."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        from scalelab.data.tokenizer import load_tokenizer
        from scalelab.models import create_model

        self.cfg = cfg
        # Building a model draws from the global RNG; its weights are replaced before every use, so
        # it must not move the training RNG (dropout after a resume would differ from the original run).
        with torch.random.fork_rng(devices=[]):
            self.model = create_model(cfg.model.preset, **cfg.model.overrides).float().eval()
        self.tokenizer = load_tokenizer(tokenizer_path(cfg.data))

    def __call__(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        from scalelab.eval import evaluate_retrieval, evaluate_sets

        shapes = self.model.state_dict()
        self.model.load_state_dict({k: v.float().reshape(shapes[k].shape) for k, v in weights.items()})
        e = self.cfg.eval
        out = evaluate_sets(self.model, self.tokenizer, e.sets, shifted=e.shifted, batch_size=e.batch_size,
                            templates=e.templates)
        if e.retrieval:
            out.update(evaluate_retrieval(self.model, self.tokenizer, e.retrieval, batch_size=e.batch_size))
        return out


def _evaluate(engine: Any, evaluator: _Evaluator | None,
              cfg: ExperimentConfig) -> dict[str, float] | Exception | None:
    """Rank 0 evaluates the weights `scalelab export` would write: the optimizer's fp32 master copies
    where there are any (ZeRO-1/2/3), else the module's own parameters (ZeRO-0; with bf16 the wrapper
    optimizer's masters are not readable through this API, so a bf16 ZeRO-0 run evaluates its bf16
    module while its export holds the masters). Collective: reading a full master (all-reduce / ZeRO-3
    gather) needs every rank. An evaluation error is returned, not raised (see `_agreed`)."""
    if not (cfg.eval.sets or cfg.eval.retrieval):
        return None
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    masters = {name: safe_get_full_fp32_param(p) for name, p in params.items()}
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero_stage(engine) == 3):
        if evaluator is None:
            return None
        weights = dict(engine.module.state_dict())  # buffers, and parameters without a master copy
        weights.update({name: m for name, m in masters.items() if m is not None})
        try:  # caught here, inside the gather, so that every rank leaves it the same way
            return evaluator(weights)
        except Exception as err:  # local to rank 0 (no collectives inside): it would recur on a retry
            return err


# --------------------------------------------------------------------------- reporting (rank 0)
class _Reporter:
    """MLflow metrics (step = global step, each logged once across restarts) and the progress line."""

    def __init__(self, cfg: ExperimentConfig, config: dict[str, Any], run: RunState) -> None:
        from scalelab.tracking import RunHandle

        self.cfg = cfg
        run_id, uri = config.get("mlflow_run_id"), config.get("tracking_uri")
        self.handle = RunHandle(uri, run_id) if run_id and uri else None
        self._t0, self._s0 = time.perf_counter(), run.step
        # A restart replays the steps after its checkpoint, bit for bit (checked in `log`); MLflow
        # appends, so each metric is logged only past the last step the run already holds.
        self._logged = self.handle.last_steps() if self.handle else {}
        self._logged_loss = self.handle.history("train/loss") if "train/loss" in self._logged else {}

    def say(self, text: str) -> None:
        # Straight to the process's stdout (Ray forwards it to the driver): Ray Train patches `print`
        # to also log, and with MLflow wrapping sys.stdout every line would appear twice.
        sys.__stdout__.write(f"[{self.cfg.name}] {text}\n")
        sys.__stdout__.flush()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        now = time.perf_counter()
        done = step - self._s0
        rate = done * self.cfg.train.global_batch / max(now - self._t0, 1e-9)
        metrics["train/samples_per_s"] = rate
        if self.handle:
            values = {k: float(v) for k, v in metrics.items() if v is not None}
            self.handle.log_metrics(values, step, logged=self._logged)
            before = self._logged_loss.get(step)
            if before is not None and repr(before) != repr(values["train/loss"]):  # exact; NaN == NaN
                self.say(f"warning: replayed step {step} gives loss {values['train/loss']!r}, the run logged "
                         f"{before!r} (kept): this run is not reproducible here")
        left = (self.cfg.train.steps - step) * self.cfg.train.global_batch / max(rate, 1e-9)
        self.say(f"step {step}/{self.cfg.train.steps} | loss {metrics['train/loss']:.4f} | "
                 f"{rate:.1f} samples/s | ETA {_clock(left)}")

    def log_eval(self, metrics: dict[str, float] | None, step: int, final: bool) -> None:
        if not metrics:
            return
        if self.handle:
            self.handle.log_metrics(metrics, step, logged=self._logged)
            if final:
                self.handle.log_dict(metrics, "eval/final.json")
        shown = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.endswith(("top1", "i2t_r1"))}
        self.say("eval " + " | ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())))


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _maybe_fail(step: int, rank: int) -> None:
    at = os.environ.get(FAIL_AT_STEP_ENV)
    if at is None or int(at) != step or int(os.environ.get(FAIL_RANK_ENV, "0")) != rank:
        return
    marker = Path(os.environ.get(FAIL_MARKER_ENV, ""))
    if not marker.name or marker.exists():
        return
    marker.write_text(str(step))
    raise RuntimeError(f"injected failure at step {step} on rank {rank} ({FAIL_AT_STEP_ENV})")
