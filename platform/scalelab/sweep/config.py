"""The sweep config (`sweeps/*.yaml`) and its expansion into trial experiment configs.

A sweep = a base experiment + the three scaling axes (data: n_pairs, model: preset, batch: global
batch) + optional extra grid keys, a budget rule that sets each trial's length, a rule for the
gradient-cache micro-batch, resources, storage and the metric the fits use. `expand(sweep)` turns it
into one `Trial` per grid point, each with its full, validated `ExperimentConfig` — every trial is
checked before anything starts. Framework-free (pydantic and the experiment config only).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from scalelab import storage
from scalelab.config import (
    ConfigError,
    ExperimentConfig,
    Frozen,
    apply_overrides,
    deep_merge,
    flatten,
    load_yaml_mapping,
    validate,
)
from scalelab.train.compute import executed_macs
from scalelab.train.memory import largest_micro_batch

__all__ = ["RECIPE_KEY", "AxesConfig", "BudgetConfig", "MicroBatchConfig", "SweepConfig", "Trial", "expand",
           "load_sweep"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_RECIPE_NAME = r"^[a-z0-9_]+$"
RECIPE_KEY = "recipe"  # the grid key of `recipes` (results.csv column `extra:recipe`)


class AxesConfig(Frozen):
    """The three scaling axes; each may hold a single value."""

    data: list[int] = Field(min_length=1, description="Distinct training pairs (data.n_pairs) per point.")
    model: list[str] = Field(min_length=1, description="Model presets (`scalelab models`).")
    batch: list[int] = Field(min_length=1, description="Global contrastive batch sizes.")

    @model_validator(mode="after")
    def _positive_unique(self) -> AxesConfig:
        for axis in ("data", "model", "batch"):
            values = getattr(self, axis)
            if len(set(values)) != len(values):
                raise ValueError(f"axes.{axis} repeats a value: {values}")
        if any(v <= 0 for v in self.data + self.batch):
            raise ValueError("axes.data and axes.batch values must be positive")
        return self


class BudgetConfig(Frozen):
    """How long each trial trains (→ train.steps = ceil(samples / batch), or the steps themselves)."""

    kind: Literal["samples", "epochs", "compute", "steps"] = Field(
        description="samples: fixed samples seen; epochs: passes over the trial's n_pairs; "
        "compute: fixed MACs executed in training (4 x forward MACs per sample x samples: the gradient "
        "cache's extra no-grad forward counts); steps: fixed optimizer "
        "steps, so a bigger batch sees proportionally more samples (BASIC's batch-size comparison)."
    )
    value: float = Field(gt=0, description="Samples, epochs, MACs or steps, per `kind`.")
    min_steps: int = Field(1, gt=0, description="Lower bound on the steps of any trial.")


class MicroBatchConfig(Frozen):
    """The gradient-cache micro-batch of each trial."""

    size: int | None = Field(None, gt=0, description="Given micro-batch (capped at the per-worker batch).")
    memory_mb: float | None = Field(
        None, gt=0,
        description="Auto: the largest power of two whose activations (the preset's measured bytes per "
        "sample) fit in this budget.",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> MicroBatchConfig:
        if (self.size is None) == (self.memory_mb is None):
            raise ValueError("micro_batch: give exactly one of size (fixed) or memory_mb (auto sizing)")
        return self


class ResourcesConfig(Frozen):
    """Ray resources of the sweep."""

    workers_per_trial: int = Field(1, gt=0, description="Ray Train workers of each trial.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker reserves.")
    use_gpu: bool = Field(False, description="One GPU per training worker.")
    max_concurrent_trials: int = Field(1, gt=0, description="Trials running at once.")


class SweepConfig(Frozen):
    """A three-axis scaling sweep."""

    name: str = Field(pattern=_NAME, max_length=120, description="Sweep name: its folder, parent MLflow run.")
    base: str = Field(description="Base experiment YAML (relative to the sweep file).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Nested changes to the base.")
    axes: AxesConfig
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Extra grid keys: dotted experiment field -> values (optim.lr)."
    )
    recipes: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named training recipes, a grid key of their own (`recipe`): "
        "each is a nested change of the base (BASIC's stages: {scratch: {}, lit: {model: {image: {init: "
        "<stage-1 run>, lock: true}}}}); trial names end in the recipe's name."
    )
    budget: BudgetConfig
    micro_batch: MicroBatchConfig
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: str = Field("./runs", description="Storage root (checkpoints, Tune state, MLflow store).")
    tracking_uri: str | None = Field(None, description="MLflow URI; None = env, else sqlite under storage.")
    mlflow_experiment: str = Field("scalelab-sweeps", description="MLflow experiment of parent and children.")
    metric: str = Field("eval/zeroshot/test/top1", description="Accuracy metric whose error the fits use.")
    robustness_metric: str | None = Field(
        "eval/zeroshot/robustness_avg/top1", description="Second metric fitted (None to skip)."
    )
    predict_compute: float | None = Field(None, gt=0, description="Predict the error at this compute (MACs).")
    holdout: int | float | None = Field(
        None, ge=0, description="Held-out check of the fits: the largest-compute trials left out of them and "
        "predicted. None: the trials at the largest compute; an integer n: the n largest-compute trials; a "
        "fraction in (0, 1): that share of the finished trials; 0: no check."
    )

    @model_validator(mode="after")
    def _holdout_kind(self) -> SweepConfig:
        h = self.holdout
        if isinstance(h, float) and not h.is_integer() and not 0 < h < 1:
            raise ValueError(f"holdout {h}: an integer count of trials or a fraction in (0, 1)")
        return self

    @model_validator(mode="after")
    def _grid_keys(self) -> SweepConfig:
        reserved = {"data.n_pairs", "model.preset", "train.global_batch", "train.steps"}
        bad = sorted(k for k in self.grid if k in reserved or not self.grid[k])
        if bad:
            raise ValueError(f"grid keys {bad}: empty, or set by the axes/budget (use axes.* instead)")
        for name, change in self.recipes.items():
            clash = sorted(k for k in flatten(change) if k in reserved)
            if clash:
                raise ValueError(f"recipe {name!r} sets {clash}: set by the axes/budget, not by a recipe")
        if RECIPE_KEY in self.grid:
            raise ValueError(f"grid key {RECIPE_KEY!r} is the recipes' (define them under recipes:)")
        bad = sorted(name for name in self.recipes if not re.match(_RECIPE_NAME, name))
        if bad:
            raise ValueError(f"recipes {bad}: a recipe name is lower-case letters, digits and '_' "
                             "(it ends the trial names)")
        return self

    def grid_points(self) -> dict[str, list[Any]]:
        """The extra grid keys (beyond the three axes) and their values, the recipes' names included."""
        return {**self.grid, **({RECIPE_KEY: list(self.recipes)} if self.recipes else {})}


@dataclass(frozen=True)
class Trial:
    """One grid point: its name (`d10000-tiny-b1024[-lr0.001]`), axis values and full experiment."""

    name: str
    data: int
    model: str
    batch: int
    extra: dict[str, Any]
    experiment: ExperimentConfig
    macs_per_sample: int = 0  # forward MACs of one sample (`models.preset_stats`), for compute accounting


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepConfig, dict]:
    """The sweep config and its base experiment dict (base path resolved against the sweep file)."""
    p = Path(path)
    sweep = validate(SweepConfig, apply_overrides(load_yaml_mapping(p, "sweep"), overrides))
    base = load_yaml_mapping((p.parent / sweep.base).resolve(), f"base experiment (relative to {p}):")
    return sweep, deep_merge(base, sweep.overrides)


def expand(sweep: SweepConfig, base: dict[str, Any], *, bytes_per_sample: dict[str, float] | None = None
           ) -> list[Trial]:
    """One validated `Trial` per grid point (axes × extra grid), in a stable order.

    `bytes_per_sample` (preset → activation bytes per sample) is needed for `micro_batch.memory_mb`.
    """
    from scalelab.models import get_spec, preset_stats

    points = sweep.grid_points()
    extra_keys = sorted(points, key=lambda k: (k == RECIPE_KEY, k))  # the recipe's name ends a trial's name
    trials = []
    for d, m, b, *extra in itertools.product(sweep.axes.data, sweep.axes.model, sweep.axes.batch,
                                             *(points[k] for k in extra_keys)):
        spec = get_spec(m, **(base.get("model", {}).get("overrides") or {}))
        per_worker = b // sweep.resources.workers_per_trial
        if b % sweep.resources.workers_per_trial:
            raise ConfigError(f"axes.batch {b} is not divisible by workers_per_trial "
                              f"{sweep.resources.workers_per_trial}")
        macs = preset_stats(spec).macs_per_sample
        steps = _steps(sweep.budget, d, b, macs)
        extras = dict(zip(extra_keys, extra))
        name = "-".join([f"d{d}", m, f"b{b}"] + [str(v) if k == RECIPE_KEY else f"{k.split('.')[-1]}{v}"
                                                  for k, v in extras.items()])
        cfg = _trial_experiment(sweep, base, name, d, m, b, steps, extras, spec,
                                _micro(sweep.micro_batch, per_worker, (bytes_per_sample or {}).get(m)))
        trials.append(Trial(name, d, m, b, extras, cfg, macs))
    return trials


def _steps(budget: BudgetConfig, n_pairs: int, batch: int, macs_per_sample: int) -> int:
    if budget.kind == "steps":
        return max(budget.min_steps, math.ceil(budget.value))
    if budget.kind == "samples":
        samples = budget.value
    elif budget.kind == "epochs":
        samples = budget.value * n_pairs
    else:
        samples = budget.value / executed_macs(macs_per_sample, 1)
    return max(budget.min_steps, math.ceil(samples / batch))


def _micro(rule: MicroBatchConfig, per_worker: int, bytes_per_sample: float | None) -> int:
    if rule.size is not None:
        return min(rule.size, per_worker)
    if bytes_per_sample is None:
        raise ConfigError("micro_batch.memory_mb needs the preset's measured activation bytes per sample")
    return largest_micro_batch(rule.memory_mb * 2**20, bytes_per_sample, limit=per_worker)


def _trial_experiment(sweep: SweepConfig, base: dict[str, Any], name: str, d: int, m: str, b: int,
                      steps: int, extras: dict[str, Any], spec: Any, micro: int) -> ExperimentConfig:
    r = sweep.resources
    point = {
        "name": f"{sweep.name}--{name}",
        "model": {"preset": m},
        "data": {"n_pairs": d, "image_size": spec.image.image_size,
                 "context_length": spec.text.context_length},
        "train": {"global_batch": b, "steps": steps, "micro_batch_size": micro,
                  "text_micro_batch_size": None, "num_workers": r.workers_per_trial,
                  "cpus_per_worker": r.cpus_per_worker, "use_gpu": r.use_gpu},
        "run": {"storage": str(storage.join(sweep.storage, sweep.name, "trials")),
                "tracking_uri": sweep.tracking_uri, "mlflow_experiment": sweep.mlflow_experiment},
    }
    merged = deep_merge(base, point)
    for key, value in extras.items():
        merged = deep_merge(merged, sweep.recipes[value] if key == RECIPE_KEY else _nested(key, value))
    return validate(ExperimentConfig, merged, prefix=f"trial {name}: ")


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out
