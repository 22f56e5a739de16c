"""Checks that refuse a run before Ray starts: every path, model/data agreement, and resume compatibility.

Pydantic already refused malformed values (unknown fields, ZeRO 5, batch not divisible by workers);
this module checks what needs the filesystem or several sections at once. Everything raises
`ConfigError` with the field, the value and what to do. Imports no framework (fast, testable alone).
"""

from __future__ import annotations

from pathlib import Path

from scalelab.config import ConfigError, ExperimentConfig, flatten
from scalelab.train.checkpoint import RunState, latest_checkpoint, read_run_state, world_size_error
from scalelab.train.ds_config import batch_geometry

__all__ = ["RESUMABLE_CHANGES", "check_experiment", "check_resume", "run_dir"]

# Fields a re-run may change and still continue the same run: they do not change what was trained so
# far. `train.steps` extends (or shortens) the run; the cosine schedule follows the new length.
RESUMABLE_CHANGES = ("name", "run.", "eval.", "train.steps", "train.cpus_per_worker",
                     "train.threads_per_worker", "data.decode_tasks", "data.decode_cpus", "data.cache")


def run_dir(cfg: ExperimentConfig) -> Path:
    """Where Ray Train keeps this run's checkpoints: `<run.storage>/<name>`."""
    return Path(cfg.run.storage) / cfg.name


def check_experiment(cfg: ExperimentConfig) -> None:
    """Everything a worker would otherwise discover minutes later (`cfg` with absolute paths)."""
    from scalelab.data.manifest import Manifest
    from scalelab.data.pipeline import select_subset, tokenizer_path
    from scalelab.data.tokenizer import load_tokenizer
    from scalelab.models import get_spec

    spec = get_spec(cfg.model.preset, **cfg.model.overrides)  # unknown preset → ConfigError
    batch_geometry(cfg.train, cfg.train.num_workers)
    for i, source in enumerate(cfg.data.sources):
        try:
            Manifest.load(source.path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.sources[{i}].path: {err}") from None
    try:
        tokenizer = load_tokenizer(tokenizer_path(cfg.data))
    except FileNotFoundError as err:
        raise ConfigError(f"data.tokenizer: {err}") from None
    if cfg.data.image_size != spec.image.image_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} but preset {cfg.model.preset!r} takes "
            f"{spec.image.image_size} px images; set one to the other (model.overrides.image.image_size)"
        )
    if cfg.data.context_length != spec.text.context_length:
        raise ConfigError(
            f"data.context_length={cfg.data.context_length} but preset {cfg.model.preset!r} has "
            f"context_length {spec.text.context_length}; set one to the other"
        )
    if tokenizer.vocab_size > spec.text.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the text tower embeds only "
            f"{spec.text.vocab_size} (model.overrides.text.vocab_size)"
        )
    rows = sum(s.take for s in select_subset(cfg.data))
    if rows < cfg.train.global_batch:
        raise ConfigError(
            f"the data holds {rows} pairs, fewer than train.global_batch={cfg.train.global_batch}"
        )
    _check_eval_paths(cfg)


def _check_eval_paths(cfg: ExperimentConfig) -> None:
    for name, directory in cfg.eval.sets.items():
        if not (Path(directory) / "classnames.txt").is_file():
            raise ConfigError(f"eval.sets.{name}: {directory} is not an ImageFolder set with classnames.txt")
    if cfg.eval.retrieval and not (Path(cfg.eval.retrieval) / "manifest.json").is_file():
        raise ConfigError(f"eval.retrieval: no pair dataset (manifest.json) at {cfg.eval.retrieval}")


def check_resume(cfg: ExperimentConfig) -> RunState | None:
    """The state of the run's latest checkpoint (None for a new run), refusing incompatible re-runs.

    A re-run must keep the worker count (ZeRO partitions) and everything that shaped training so far;
    only `RESUMABLE_CHANGES` may differ. The message lists the differing fields.
    """
    latest = latest_checkpoint(run_dir(cfg))
    if latest is None:
        return None
    state = read_run_state(latest)
    if state.world_size != cfg.train.num_workers:
        raise ConfigError(world_size_error(latest, state.world_size, cfg.train.num_workers))
    old, new = flatten(state.config), flatten(cfg.to_dict())
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(
            f"run {cfg.name!r} exists at {latest.parent} with a different config ({diffs}). Resuming would "
            "mix two experiments: choose another name, or restore the old values."
        )
    return state
