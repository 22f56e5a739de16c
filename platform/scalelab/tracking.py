"""MLflow conventions for scalelab: where the store lives, experiments, resumable runs, keys, figures.

Training and sweep code log through a `RunHandle` (an `MlflowClient` bound to one run id), never through
MLflow's global active-run state, so a handle is safe inside Ray workers and picklable across them.
This module knows nothing about ranks: callers log from rank 0 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from scalelab import storage
from scalelab.config import ConfigError

RUN_KEY_TAG = "scalelab.run_key"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests children under it
# MLflow's limits (mlflow/utils/validation.py); exceeding them fails the whole batch.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow 3 opens an experiment without a kind in its GenAI view (traces, judges; a sweep's children
# listed as "Evaluation runs"); this kind lands a user on the runs table and the metric charts.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# MLflow's run description (Markdown, shown on the run's overview page).
DESCRIPTION_TAG = "mlflow.note.content"
# MLflow 3.17's UI takes the experiment's view from a global "GenAI | Model training" switch (kept in
# the browser; GenAI by default) rather than from the experiment's kind; a link carrying this opens
# the model-training view (runs table, charts) whatever the browser last used.
UI_VIEW_QUERY = "workflowType=machine_learning"

# Characters MLflow accepts in metric/param names on every OS (colon is refused on Windows).
_KEY_CHARS = re.compile(r"^[A-Za-z0-9_\-. /]+$")
_BAD_KEY_CHAR = re.compile(r"[^A-Za-z0-9_\-. /]")
# Substrings that mark a credential. "token" is matched per word (below) instead, so that
# `data.tokenizer` or `max_tokens` stay logged while `hf_token` / `authtoken` do not.
_SECRET_WORDS = ("password", "passwd", "secret", "api_key", "apikey", "access_key", "private_key")


def default_tracking_uri(storage_root: str | Path) -> str:
    """`sqlite:///<abs storage_root>/mlflow.db`: the store sits beside the checkpoints: resume = re-run.

    A storage URI (`s3://…`) has no default: a sqlite database needs a POSIX file (locks, in-place
    writes) that an object store is not, so the store must be named (`store_required`)."""
    if storage.is_uri(storage_root):
        raise ConfigError(store_required(str(storage_root)))
    root = Path(storage_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def store_required(storage_root: str) -> str:
    """The message for a storage URI without an MLflow tracking URI."""
    return (
        f"run.storage is {storage.describe(storage_root)}: the MLflow tracking store cannot live there "
        "(sqlite needs a local file). Name it with run.tracking_uri (sweep: tracking_uri) or "
        "MLFLOW_TRACKING_URI: the head's server on a cluster (http://<head>:5000), or a local "
        "sqlite:////abs/path/mlflow.db on one machine. Artifacts still go to <storage>/mlartifacts "
        "when the store is sqlite."
    )


def resolve_tracking_uri(explicit: str | None, storage_root: str | Path) -> str:
    """Explicit URI, else env `MLFLOW_TRACKING_URI` (on clusters: the head's server), else the default
    (none for a storage URI: ConfigError)."""
    if explicit:
        return explicit
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    return default_tracking_uri(storage_root)


def default_artifact_root(tracking_uri: str, storage_root: str | Path) -> str | None:
    """`<storage_root>/mlartifacts` for a local sqlite store; None for a server, whose own
    `--default-artifact-root` (or artifact proxy) must decide, since workers may not share our disk.

    On a storage URI the artifacts go beside the checkpoints, `s3://bucket/…/mlartifacts`, through
    MLflow's own artifact store for the scheme (S3: boto3, with `MLFLOW_S3_ENDPOINT_URL` or
    `AWS_ENDPOINT_URL` for a custom endpoint; the URI's query is not passed to MLflow)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    if storage.is_uri(storage_root):
        return storage.artifact_uri(storage.join(str(storage_root), "mlartifacts"))
    root = Path(storage_root).expanduser().resolve() / "mlartifacts"
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def _artifact_uri(artifact_root: str | Path) -> str:
    text = str(artifact_root)
    return text if "://" in text else Path(text).expanduser().resolve().as_uri()


def get_or_create_experiment(name: str, tracking_uri: str, artifact_root: str | Path | None = None) -> str:
    """Experiment id for `name`, creating it (with `artifact_root`) if missing.

    Create it from the driver once; still race-tolerant: concurrent creators hit the store's UNIQUE
    constraint, and the loser fetches the winner's experiment. The artifact location of an existing
    experiment is never changed.
    """
    with _new_store_lock(tracking_uri):  # the client creates a new store (its tables) when it starts
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        existing = client.get_experiment_by_name(name)
    if existing is None:
        location = _artifact_uri(artifact_root) if artifact_root is not None else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException:
            existing = client.get_experiment_by_name(name)
            if existing is None:  # a real failure, not a lost race
                raise
    if existing.lifecycle_stage != "active":
        # A deleted experiment keeps its name reserved; silently restoring it would surprise the user.
        raise ValueError(
            f"MLflow experiment {name!r} (id {existing.experiment_id}) is deleted; restore it "
            "(`mlflow experiments restore`) or choose another experiment name"
        )
    for key, value in EXPERIMENT_TAGS.items():  # made before scalelab set the kind; a user's own stays
        if key not in existing.tags:
            client.set_experiment_tag(existing.experiment_id, key, value)
    return existing.experiment_id


def ui_url(experiment_id: str, run_id: str | None = None, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's page of a run (or of the experiment's runs table) in its model-training view."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?{UI_VIEW_QUERY}"


@contextlib.contextmanager
def _new_store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise the first touch of a sqlite store across processes: MLflow creates a new store by
    running its migrations, and two commands doing it at once (two `scalelab train` started together
    on a fresh storage) fail with "table _alembic_tmp_tags already exists". A file lock beside the
    database; other stores need none."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def find_run_by_tag(tracking_uri: str, experiment_id: str, key: str, value: str) -> str | None:
    """Id of the oldest active run in the experiment with tag `key == value`, or None."""
    if "'" in value or "`" in key:
        raise ValueError(f"tag {key!r}={value!r}: quotes cannot be used in an MLflow search filter")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{key}` = '{value}'",  # backticks: our tag keys contain dots
        order_by=["attributes.start_time ASC"],  # oldest first: a stable answer if duplicates exist
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def finished_run(tracking_uri: str, experiment_name: str, key: str, value: str) -> str | None:
    """The id of the run tagged (key, value) when it exists and is FINISHED; None otherwise."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    run_id = experiment and find_run_by_tag(tracking_uri, experiment.experiment_id, key, value)
    if run_id and client.get_run(run_id).info.status == "FINISHED":
        return run_id
    return None


def start_or_resume_run(
    tracking_uri: str,
    experiment_id: str,
    *,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    resume_tag: tuple[str, str] | None = None,
    parent_run_id: str | None = None,
) -> RunHandle:
    """Continue the run tagged `resume_tag` (key, value) if there is one, else create it.

    `resume_tag` defaults to (`scalelab.run_key`, `run_name`). A resumed run is THE SAME MLflow run,
    set back to RUNNING, with `tags` re-applied (the code version may have moved), so its metric
    history continues instead of splitting across a duplicate. Not safe against two processes starting
    the same key at the same instant; the sweep driver / rank 0 is the only caller.
    """
    tag_key, tag_value = resume_tag if resume_tag is not None else (RUN_KEY_TAG, run_name)
    all_tags = {**dict(tags or {}), tag_key: tag_value}
    if parent_run_id is not None:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run_id = find_run_by_tag(tracking_uri, experiment_id, tag_key, tag_value)
    if run_id is None:
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        return RunHandle(tracking_uri, run.info.run_id)
    client.update_run(run_id, status="RUNNING")
    handle = RunHandle(tracking_uri, run_id)
    handle.set_tags(all_tags)
    return handle


def _is_credential_key(key: str) -> bool:
    lowered = key.lower()
    if any(word in lowered for word in _SECRET_WORDS):
        return True
    return any(word.endswith("token") for word in re.split(r"[^a-z0-9]+", lowered))


def sanitize_key(key: str) -> str:
    """Replace characters MLflow refuses in param names by '_' and cut to MLflow's key length."""
    return _BAD_KEY_CHAR.sub("_", str(key))[:MAX_KEY_LENGTH] or "_"


def metric_key(*parts: str) -> str:
    """Join parts with '/' into a stable metric key (`train/loss`, `eval/zeroshot/test/top1`).

    Raises ValueError for empty parts, characters MLflow refuses (allowed: ASCII alphanumerics,
    `_ - . / space`) or names that are not normalised paths (`a//b`, `../x`), which MLflow also refuses.
    """
    if not parts or any(not str(part) for part in parts):
        raise ValueError(f"metric key parts must be non-empty strings, got {parts!r}")
    key = "/".join(str(part) for part in parts)
    if not _KEY_CHARS.match(key):
        bad = sorted(set(_BAD_KEY_CHAR.findall(key)))
        raise ValueError(f"metric key {key!r} has characters MLflow refuses: {bad}")
    normalised = posixpath.normpath(key)
    if normalised != key or normalised == "." or key.startswith(("/", "..")):
        raise ValueError(f"metric key {key!r} must be a normalised relative path (no '//', '.', '..', '/x')")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"metric key {key!r} is longer than MLflow's {MAX_KEY_LENGTH} characters")
    return key


def metric_entries(metrics: Mapping[str, float | None], step: int, *, logged: Mapping[str, int] | None = None,
                   timestamp: int | None = None) -> list[Metric]:
    """The MLflow entries `RunHandle.log_metrics` logs for `metrics` at `step` (its docstring)."""
    timestamp = int(time.time() * 1000) if timestamp is None else int(timestamp)
    done = logged or {}
    return [Metric(metric_key(key), float(value), timestamp, int(step))
            for key, value in metrics.items() if value is not None and int(step) > done.get(key, -1)]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RunHandle:
    """One MLflow run, addressed by id through an `MlflowClient` (no global active run).

    Pickles as (tracking_uri, run_id) so it can be handed to Ray workers; the client is rebuilt there.
    Usable as a context manager: finishes FINISHED, or FAILED / KILLED when the block raises.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: mlflow.MlflowClient | None = None

    @property
    def client(self) -> mlflow.MlflowClient:
        if self._client is None:
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def __reduce__(self) -> tuple[type[RunHandle], tuple[str, str]]:
        return (RunHandle, (self.tracking_uri, self.run_id))

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"

    def __enter__(self) -> RunHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def log_params(self, flat: Mapping[str, Any]) -> list[str]:
        """Log flat params (use `scalelab.config.flatten` first); returns the keys omitted as credentials.

        Values are stringified and truncated to MLflow's 6000 characters; keys are sanitised
        (`sanitize_key`). Keys that look like credentials (containing password, secret, api_key,
        access_key, private_key, or a word ending in "token" such as `hf_token`; case-insensitive) are
        NOT logged: params are readable by anyone with access to the store. On a resumed run,
        params already logged with the same value are skipped; a changed value raises ValueError,
        because MLflow params are immutable (log it as a tag or a new run instead).
        """
        omitted = sorted(str(key) for key in flat if _is_credential_key(str(key)))
        params = {
            sanitize_key(key): str(value)[:MAX_PARAM_VALUE_LENGTH]
            for key, value in flat.items()
            if not _is_credential_key(str(key))
        }
        existing = self.client.get_run(self.run_id).data.params
        changed = sorted(key for key, value in params.items() if key in existing and existing[key] != value)
        if changed:
            raise ValueError(
                f"run {self.run_id} already has different values for params {changed}; "
                "MLflow params cannot change (start a new run or log the change as a tag)"
            )
        new = [Param(key, value) for key, value in params.items() if key not in existing]
        for chunk in _chunks(new, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)
        return omitted

    def log_metrics(
        self, metrics: Mapping[str, float | None], step: int, *, logged: Mapping[str, int] | None = None,
        timestamp: int | None = None,
    ) -> list[str]:
        """Log metrics at `step` (the global step / samples seen, never Tune's iteration, which resets on
        resume) in one `log_batch`; returns the keys logged. None values are dropped; NaN/inf are logged
        as is, since MLflow stores them and a diverging loss must stay visible. Keys are checked with
        `metric_key`. `logged` ({key: last step already in the run}, from `last_steps`) drops the keys
        whose `step` the run already holds: MLflow appends every entry, so a resumed worker replaying
        the steps between its checkpoint and the interruption would otherwise log them twice.
        `timestamp`: milliseconds since the epoch (default now)."""
        entries = metric_entries(metrics, step, logged=logged, timestamp=timestamp)
        self.log_entries(entries)
        return [m.key for m in entries]

    def log_entries(self, entries: list[Metric]) -> None:
        """Log `metric_entries` of any number of steps: one `log_batch` per 1000 (a write of eight steps
        at once costs the store a third of eight writes of one step each)."""
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def history(self, key: str) -> dict[int, float]:
        """{step: value} of one metric (the last value where a step was logged more than once)."""
        entries = sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.timestamp)
        return {int(m.step): float(m.value) for m in entries}

    def last_steps(self) -> dict[str, int]:
        """{metric key: largest step logged} for every metric of the run ({} for a new run)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {key: max(self.history(key)) for key in keys}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (overwrite) tags; values are stringified (MLflow truncates them at 8000 characters)."""
        entries = [RunTag(str(key), str(value)) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_PER_BATCH):  # MLflow's per-batch tag limit = params'
            self.client.log_batch(self.run_id, tags=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file or directory into the run's artifacts (under `artifact_path`)."""
        local = Path(path)
        if local.is_dir():
            self.client.log_artifacts(self.run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(local), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write `text` as the artifact `artifact_file` (e.g. 'config/resolved.yaml')."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """Write a dict as JSON, or YAML when `artifact_file` ends in .yaml/.yml (MLflow picks by suffix)."""
        self.client.log_dict(self.run_id, dict(d), artifact_file)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Save a matplotlib figure as the artifact `artifact_file` (e.g. 'plots/loss_vs_compute.png').
        Re-logging the same file replaces it, so sweep plots can be refreshed on resume."""
        self.client.log_figure(self.run_id, fig, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED (a later resume sets it back to RUNNING)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
        self.client.set_terminated(self.run_id, status)


def code_version() -> dict[str, str]:
    """Tags naming the code that ran: `scalelab.version` always; `scalelab.git_sha` and
    `scalelab.git_dirty` when scalelab runs from a git working tree (not from an installed wheel)."""
    from scalelab import __version__  # imported here: the package __init__ stays framework-free

    tags = {"scalelab.version": __version__}
    here = str(Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        # Tracked changes only: untracked scratch files should not mark every run dirty.
        status = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return tags
    if sha:
        tags["scalelab.git_sha"] = sha
        tags["scalelab.git_dirty"] = str(bool(status.strip())).lower()
    return tags
