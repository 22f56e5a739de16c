"""The sweep driver: checks every trial, creates the parent MLflow run, runs the grid on Ray Tune.

Tune runs a plain function per trial (the Train V2 pattern: a trial builds its `TorchTrainer` through
`train.launch` and calls `fit()`), on a plain grid with FIFO scheduling — early-stopping schedulers
compare trials at equal iterations, meaningless across model and batch sizes, and would kill the
points a scaling curve needs. Each trial's Train run is named `<sweep>--<point>` under
`<storage>/<sweep>/trials`, so a re-run trial resumes its own checkpoints; its MLflow run is the
parent's child, found again by the `scalelab.trial` tag, so a resumed trial never opens a duplicate.

Resume: the Tune experiment lives in `<storage>/<sweep>/tune`. Running the same command again restores
it (`Tuner.restore(..., resume_unfinished=True, resume_errored=True)`): finished trials are kept, the
interrupted and failed ones continue from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from scalelab import storage
from scalelab.config import ConfigError, resolve_paths
from scalelab.storage import Location
from scalelab.sweep.analysis import analyse, log_analysis, summary_lines
from scalelab.sweep.config import SweepConfig, Trial, expand
from scalelab.sweep.results import SweepState, collect_results, read_state, state_path, write_state

__all__ = ["TRIAL_TAG", "run_sweep", "sweep_dir"]

TRIAL_TAG = "scalelab.trial"
PARENT_TAG = "scalelab.sweep_parent"
ROOT_ENV = "SCALELAB_ROOT"
LOG_NAME = "console.log"  # under <storage>/<sweep>: what Ray, DeepSpeed and the workers print
TRIAL_CPUS = 0.01  # what a Tune trial's own function reserves (it only waits on its TorchTrainer)


def sweep_dir(sweep: SweepConfig) -> Location:
    """`<storage>/<sweep>`: a Path, or a URI when the storage is one (`storage.py`)."""
    return storage.join(sweep.storage, sweep.name)


def console_log(sweep: SweepConfig) -> Path:
    """`<storage>/<sweep>/console.log`; for a storage URI a local `./scalelab-logs/<sweep>/console.log`
    (the log is appended line by line; an object store only takes whole files)."""
    if storage.is_uri(sweep.storage):
        return Path.cwd() / "scalelab-logs" / sweep.name / LOG_NAME
    return Path(sweep_dir(sweep)) / LOG_NAME


def resolve_root(sweep: SweepConfig) -> SweepConfig:
    """Make `storage` absolute: against `SCALELAB_ROOT` when set, else the current directory — except
    inside a submitted Ray job, whose current directory is a temporary copy of the working dir that
    disappears with the job: there a relative storage is refused unless `SCALELAB_ROOT` names a root."""
    if "://" in sweep.storage or Path(sweep.storage).is_absolute():
        return sweep
    root = os.environ.get(ROOT_ENV)
    if root is None and _in_ray_job_working_dir():
        raise ConfigError(
            f"storage={sweep.storage!r} is relative, and this is a Ray job running in a temporary working "
            f"dir: pass an absolute --set storage=/shared/runs (or s3://...), or set {ROOT_ENV} in the "
            "job's runtime env"
        )
    base = Path(root) if root else Path.cwd()
    return sweep.model_copy(update={"storage": str((base / sweep.storage).resolve())})


def _in_ray_job_working_dir() -> bool:
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        return bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def plan(sweep: SweepConfig, base: dict[str, Any]) -> list[Trial]:
    """Every trial, expanded and checked (paths, preset/data agreement, resume compatibility) up front."""
    from scalelab.models import activation_bytes_per_sample
    from scalelab.train.preflight import check_experiment, check_resume

    per_sample = None
    if sweep.micro_batch.memory_mb is not None:
        per_sample = {m: activation_bytes_per_sample(m) for m in sweep.axes.model}
    root = Path(os.environ.get(ROOT_ENV) or Path.cwd())
    trials = [dataclasses.replace(t, experiment=resolve_paths(t.experiment, root))
              for t in expand(sweep, base, bytes_per_sample=per_sample)]
    for t in trials:
        try:
            check_experiment(t.experiment)
            check_resume(t.experiment)
        except ConfigError as err:
            raise ConfigError(f"trial {t.name}: {err}") from None
    return trials


def run_sweep(sweep: SweepConfig, base: dict[str, Any], *, ray_address: str | None = None,
              verbose: bool = False) -> tuple[SweepState, list[Any]]:
    """Run (or resume) the sweep; returns its state and the per-trial results.

    The terminal shows a live view of the trials, then the results table, the fits and the MLflow
    link; Ray's, DeepSpeed's and the workers' own output goes to `<storage>/<sweep>/console.log`
    (`verbose`: to the terminal, as it comes)."""
    from scalelab.console import session
    from scalelab.tracking import resolve_tracking_uri, ui_url

    sweep = resolve_root(sweep)
    uri = resolve_tracking_uri(sweep.tracking_uri, sweep.storage)
    sweep = sweep.model_copy(update={"tracking_uri": uri})
    trials = plan(sweep, base)
    _check_local_resources(trials, ray_address)
    log = console_log(sweep)
    with session(log, verbose=verbose) as console:
        say = console.say
        state = _parent_run(sweep, trials)
        say(f"[{sweep.name}] {len(trials)} trials; MLflow parent run {state.parent_run_id}; "
            f"state in {storage.describe(sweep_dir(sweep))}")
        if not verbose:
            say(f"[{sweep.name}] Ray, DeepSpeed and the workers' own output: {log}")

        from scalelab.train.launch import ensure_ray, release_ray

        ensure_ray(ray_address)
        try:
            _tune(sweep, trials, state, console, log_path=None if verbose else log)
        finally:
            release_ray()
        results = collect_results(state)
        analysis = analyse(state, results)
        with tempfile.TemporaryDirectory(prefix="scalelab-analysis-") as scratch:
            log_analysis(state, results, analysis, Path(scratch))
        _finish_parent(state, results)
        for line in summary_lines(state, results, analysis):
            say(line)
        say(f"open MLflow: mlflow ui --backend-store-uri {uri}  →  "
            f"{ui_url(state.experiment_id, state.parent_run_id)}")
    return state, results


def _check_local_resources(trials: list[Trial], ray_address: str | None) -> None:
    """Every trial must fit this machine when the sweep starts local Ray (a trial that cannot would
    wait for its CPUs forever); on a cluster the trials wait for nodes the autoscaler adds."""
    from scalelab.train.preflight import local_capacity, refuse_short_resources, starts_local_ray

    if not starts_local_ray(ray_address):
        return
    capacity = local_capacity()
    for t in trials:
        try:
            refuse_short_resources(t.experiment, capacity, "this machine", extra_cpus=TRIAL_CPUS)
        except ConfigError as err:  # a sweep sets these through its resources section
            hint = str(err).replace("train.cpus_per_worker", "resources.cpus_per_worker").replace(
                "use fewer workers", "lower resources.workers_per_trial")
            raise ConfigError(f"trial {t.name}: {hint}") from None


def _parent_run(sweep: SweepConfig, trials: list[Trial]) -> SweepState:
    """The sweep's parent run: created once, its id kept in sweep.json; a re-run reuses it."""
    from scalelab.config import flatten
    from scalelab.tracking import (
        code_version,
        default_artifact_root,
        get_or_create_experiment,
        start_or_resume_run,
    )

    uri = sweep.tracking_uri
    artifacts = default_artifact_root(uri, sweep.storage)
    experiment = get_or_create_experiment(sweep.mlflow_experiment, uri, artifacts)
    previous = read_state(sweep_dir(sweep)) if storage.is_file(state_path(sweep_dir(sweep))) else None
    planned = [{"name": t.name, "data": t.data, "model": t.model, "batch": t.batch, "extra": t.extra,
                "steps": t.experiment.train.steps, "macs_per_sample": t.macs_per_sample} for t in trials]
    if previous is not None and [p["name"] for p in previous.trials] != [p["name"] for p in planned]:
        raise ConfigError(
            f"sweep {sweep.name!r} at {storage.describe(sweep_dir(sweep))} was started with another grid; "
            "a resumed sweep cannot change its search space — choose a new sweep name"
        )
    handle = start_or_resume_run(uri, experiment, run_name=sweep.name, resume_tag=(PARENT_TAG, sweep.name),
                                 tags={**code_version(), "sweep": sweep.name, "scalelab.role": "sweep"})
    flat = {k: v for k, v in flatten(sweep.to_dict()).items() if k != "tracking_uri"}
    existing = handle.client.get_run(handle.run_id).data.params
    handle.log_params({k: v for k, v in flat.items() if k not in existing})
    state = SweepState(sweep.name, uri, experiment, handle.run_id, sweep.metric, sweep.robustness_metric,
                       sweep.predict_compute, planned, sweep.holdout)
    write_state(sweep_dir(sweep), state)
    handle.log_dict({"sweep": sweep.to_dict(), "trials": planned}, "sweep.json")
    return state


def _finish_parent(state: SweepState, results: list[Any]) -> None:
    from scalelab.tracking import RunHandle

    done = all(r.finished for r in results)
    RunHandle(state.tracking_uri, state.parent_run_id).finish("FINISHED" if done else "FAILED")


def _tune(sweep: SweepConfig, trials: list[Trial], state: SweepState, console: Any, *,
          log_path: Path | None) -> Any:
    from ray import tune

    from scalelab.console import LiveView, RunTable
    from scalelab.sweep.live import LiveTrials, Refit
    from scalelab.sweep.trial import run_trial

    path = storage.join(sweep_dir(sweep), "tune")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, experiments={t.name: t.experiment.to_dict() for t in trials},
                             axes={t.name: (t.data, t.model, t.batch) for t in trials},
                             sweep_name=sweep.name, parent_run_id=state.parent_run_id),
        {"cpu": TRIAL_CPUS},
    )
    table = RunTable(sweep.metric)
    for t, done in zip(trials, collect_results(state)):  # a resumed sweep's finished trials show as such
        row = table.row(t.name, steps=t.experiment.train.steps, batch=t.batch)
        row.state, row.step = ("TERMINATED", t.experiment.train.steps) if done.finished else ("PENDING", 0)
        row.metric = done.metrics.get(sweep.metric)
    with LiveView(console, table) as view:
        live = LiveTrials(f"{sweep.name}:{state.parent_run_id}", table, view, log_path)
        refit = Refit(state)
        try:
            return _fit_tuner(sweep, trials, path, trainable, [live, refit], view.say)
        finally:
            live.close()
            refit.close()


def _fit_tuner(sweep: SweepConfig, trials: list[Trial], path: Location, trainable: Any, callbacks: list[Any],
               say: Any) -> Any:
    from ray import tune

    if tune.Tuner.can_restore(str(path)):
        say(f"[{sweep.name}] resuming the sweep from {path}: finished trials are kept, "
            "interrupted and failed ones continue from their checkpoints")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        # The restored run config carries the callbacks pickled by the first run (possibly an older
        # scalelab); use this run's instead. `restore` takes no callbacks argument.
        tuner._local_tuner.get_run_config().callbacks = callbacks
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.name for t in trials])},
            # reuse_actors: a trial actor runs the next trial in the same process, whose imports and
            # MLflow store (~2 s of MLflow's first use, ~1 s of process start) the next trial then finds
            # ready; every trial asks for the same resources, so any idle trial actor fits any trial.
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.resources.max_concurrent_trials,
                                        reuse_actors=True, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir(sweep)), callbacks=callbacks,
                                      verbose=0),
        )
    return tuner.fit()


def _trial_name(trial: Any) -> str:
    return str(trial.config["trial"])
