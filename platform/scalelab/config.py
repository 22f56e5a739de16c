"""Typed, validated configuration: model specs, loss, optimizer, training, experiment.

Configs are frozen pydantic models that refuse unknown fields. YAML (and `--set a.b=value` dot
overrides) come in at the edge; `to_dict()` / `flatten()` give plain dicts for MLflow params and Ray.
This module is a leaf: it imports no other scalelab module and no framework.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ClassifyConfig",
    "ConfigError",
    "DataConfig",
    "DataSourceConfig",
    "EvalConfig",
    "ExperimentConfig",
    "Frozen",
    "ImageTowerConfig",
    "ImageTrainConfig",
    "LabelsConfig",
    "LossConfig",
    "ModelConfig",
    "ModelSpec",
    "OptimConfig",
    "RunSettings",
    "TextTowerConfig",
    "TrainConfig",
    "apply_overrides",
    "deep_merge",
    "flatten",
    "format_validation_error",
    "load_experiment",
    "load_yaml_mapping",
    "parse_overrides",
    "resolve_paths",
]

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


class ConfigError(ValueError):
    """A configuration was refused. The message names the field and what is allowed."""


class Frozen(BaseModel):
    """Base of every config: immutable, unknown fields refused, defaults validated."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON types only), suitable for YAML, Ray and MLflow."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- model axis
class ImageTowerConfig(Frozen):
    """Image tower: any timm backbone (built with pretrained=False, num_classes=0) plus a projection."""

    timm_name: str = Field(description="timm model name, e.g. 'vit_tiny_patch16_224', 'coatnet_0_rw_224'.")
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for timm.create_model (embed_dim, depth, patch_size, ...).",
    )
    image_size: int = Field(gt=0, description="Input resolution in pixels (square images).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="timm drop_rate (dropout before the head).")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="timm drop_path_rate (stochastic depth).")
    norm: Literal["batch", "group"] = Field(
        "batch",
        description="'batch' keeps the backbone's BatchNorm layers; 'group' swaps each for a per-sample "
        "GroupNorm so that the gradient cache is exact (BatchNorm couples samples of a micro-batch).",
    )


class TextTowerConfig(Frozen):
    """Text tower: a pre-norm Transformer encoder over token ids (0 = padding), masked-mean pooled."""

    vocab_size: int = Field(gt=1, description="Number of token ids, padding id 0 included.")
    context_length: int = Field(gt=0, description="Maximum number of tokens per caption.")
    width: int = Field(gt=0, description="Model width (embedding size).")
    depth: int = Field(gt=0, description="Number of Transformer blocks.")
    heads: int = Field(gt=0, description="Attention heads; must divide width.")
    mlp_ratio: float = Field(4.0, gt=0, description="Hidden size of the MLP as a multiple of width.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in attention, MLP and embeddings.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TextTowerConfig:
        if self.width % self.heads:
            raise ValueError(f"text.heads={self.heads} must divide text.width={self.width}")
        return self


class ModelSpec(Frozen):
    """A complete dual-encoder description: what a preset resolves to."""

    name: str = Field(description="Preset name this spec came from (or 'custom').")
    image: ImageTowerConfig
    text: TextTowerConfig
    embed_dim: int = Field(gt=0, description="Shared embedding dimension of both projections.")
    init_logit_scale: float = Field(
        CLIP_INIT_LOGIT_SCALE, description="Initial log temperature scale (CLIP: ln(1/0.07))."
    )
    logit_bias: bool = Field(False, description="Add a learnable logit bias (needed by the sigmoid loss).")
    init_logit_bias: float = Field(-10.0, description="Initial logit bias (SigLIP: -10).")
    grad_checkpointing: bool = Field(
        False, description="Activation checkpointing inside both towers (recompute blocks in backward)."
    )

    @property
    def image_size(self) -> int:
        return self.image.image_size

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def context_length(self) -> int:
        return self.text.context_length


class ImageTrainConfig(Frozen):
    """How the image tower starts and trains (BASIC's pretrained tower; LiT's locked one).

    Not part of the ModelSpec: these change how a tower is trained, not what the model is, so an
    export or `scalelab models` never sees them.
    """

    init: str | None = Field(
        None, description="Start the image tower from weights, never downloaded: a timm-compatible file "
        "(.safetensors, or torch .pt/.pth/.bin) holding a bare timm model's state dict (the trunk; the "
        "projection keeps its init) or scalelab's `image_tower.` keys (the whole tower), a `scalelab "
        "export` directory, a checkpoint folder, or a run directory (its newest complete checkpoint). "
        "None: random init.",
    )
    lock: bool = Field(
        False, description="LiT: the whole image tower (trunk and projection) is locked: eval mode, no "
        "gradient, encoded once per sample with no replay. The text tower and the temperature train.",
    )
    unlock_at_step: int | None = Field(
        None, gt=0, description="With lock: the first this many optimizer steps are locked, the tower "
        "trains from the next one on (MLflow step unlock_at_step + 1). None: locked for the whole run.",
    )
    lr_mult: float = Field(
        1.0, gt=0, description="The image tower's learning rate is the schedule's times this (its own "
        "parameter groups). To freeze the tower use lock, not a tiny multiplier.",
    )

    @model_validator(mode="after")
    def _combinations(self) -> ImageTrainConfig:
        if self.init is not None and not self.init.strip():
            raise ValueError("model.image.init is empty: give a weights file or directory, or leave it out")
        if self.unlock_at_step is not None and not self.lock:
            raise ValueError("model.image.unlock_at_step needs model.image.lock: true (the tower is locked "
                             "until that step)")
        if self.lock and self.unlock_at_step is None and self.lr_mult != 1.0:
            raise ValueError(f"model.image.lr_mult={self.lr_mult} has no effect on a tower locked for the "
                             "whole run: set model.image.unlock_at_step, or leave lr_mult out")
        return self


class ModelConfig(Frozen):
    """The model axis of an experiment: a named preset plus optional overrides of its spec."""

    preset: str = Field("tiny", description="Preset name; `scalelab models` lists them.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Partial ModelSpec merged into the preset, e.g. {text: {dropout: 0.1}}.",
    )
    image: ImageTrainConfig = Field(
        default_factory=ImageTrainConfig,
        description="Pretrained weights, lock / unlock and learning-rate multiplier of the image tower.",
    )


# --------------------------------------------------------------------------- data axis
class DataSourceConfig(Frozen):
    """One dataset directory (shards + manifest.json) and its mixing weight."""

    path: str = Field(description="Dataset directory holding manifest.json and its shards.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in every batch.")


class LabelsConfig(Frozen):
    """How class labels are read from each sample's json (`task: classify`; shard datasets only)."""

    field: str = Field(
        "label", min_length=1, description="Key of the label in each sample's json: one int (a class "
        "index in [0, num_classes)) or a list of them (multi-label, as JFT). `scalelab data from-labels` "
        "writes 'label'; the synthetic labelled set writes 'label' (object class) and 'labels' (class and "
        "colour)."
    )
    num_classes: int | None = Field(
        None, gt=1, description="Size of the label space; None = read from the first source's manifest "
        "(extra.label_names[field], or extra.classnames for field 'label')."
    )
    max_labels: int = Field(
        1, gt=0, description="Most labels one sample may carry (a sample with more is skipped and counted "
        "as too_many_labels). 1 for classify.head softmax; raise it for multi-label data (head sigmoid)."
    )


class DataConfig(Frozen):
    """Where training pairs come from and how they are decoded, augmented and tokenized."""

    sources: list[DataSourceConfig] = Field(
        default_factory=lambda: [DataSourceConfig(path="runs/data/synth")],
        min_length=1,
        description="Datasets to mix (alt-text pairs + labels-to-text pairs, as BASIC mixed ALIGN and JFT).",
    )
    n_pairs: int | None = Field(
        None, gt=0, description="Data axis: distinct training pairs (a fixed, seeded subset); None = all."
    )
    image_size: int = Field(32, gt=0, description="Training resolution in pixels.")
    context_length: int = Field(32, gt=0, description="Tokens per caption (padded / truncated).")
    tokenizer: str | None = Field(
        None, description="Tokenizer JSON path; None = tokenizer.json next to the first source's manifest."
    )
    seed: int = Field(0, description="Seed of the subset choice and of the per-epoch shuffles.")
    augment: bool = Field(True, description="Random-resized-crop for training (eval always resizes).")
    crop_scale: tuple[float, float] = Field(
        (0.7, 1.0), description="Area fraction range of the random-resized-crop."
    )
    hflip: bool = Field(
        False, description="Random horizontal flip. Off by default: captions may say 'left'/'right'."
    )
    decode_tasks: int = Field(1, gt=0, description="Decode tasks running at once per dataset (Ray Data).")
    decode_batch_size: int = Field(256, gt=0, description="Rows per map_batches call.")
    decode_cpus: float = Field(
        1.0, gt=0, description="CPUs each decode task reserves (fractions share a core with training)."
    )

    labels: LabelsConfig | None = Field(
        None, description="Read class labels from the samples' json (required by task: classify, where "
        "captions and the tokenizer are not used); None = image-text pairs."
    )
    cache: bool = Field(
        False, description="Decode the training subset once per worker and keep it in memory (small "
        "datasets: the synthetic world, laptop sweeps); epochs then skip Ray Data entirely. Same rows, "
        "same order as without it. Needs augment: false (augmented rows differ every epoch)."
    )

    @model_validator(mode="after")
    def _crop_range(self) -> DataConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.cache and self.augment:
            raise ValueError("data.cache needs data.augment: false (augmented rows differ every epoch, "
                             "so decoded rows cannot be reused)")
        return self


# --------------------------------------------------------------------------- loss / optim / train
class LossConfig(Frozen):
    """The contrastive objective."""

    kind: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="'softmax' (CLIP/ALIGN/BASIC symmetric InfoNCE) or 'sigmoid' (SigLIP)."
    )
    block_size: int | None = Field(
        None, gt=0, description="Tile size of the tiled loss (memory O(B*block)); None = dense BxB matrix."
    )


class OptimConfig(Frozen):
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adafactor", "lion", "adafactor_bv"] = Field(
        "adamw",
        description="'adamw' (torch); 'adafactor' (torch's Adafactor, as BASIC: lr is a relative step cap); "
        "'lion' (timm's Lion: sign of interpolated momentum; its lr is typically 3-10x smaller than AdamW's "
        "and its weight_decay 3-10x larger, nothing is rescaled for you); 'adafactor_bv' (timm's "
        "big_vision Adafactor: factored second moment, momentum betas[0] kept in bf16, no update clipping, "
        "beta2 = min(0.999, 1 - t^-0.8); lr is an absolute step as AdamW's; ZeRO-0 only). "
        "Details: scalelab/train/optim.py.",
    )
    lr: float = Field(5e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(
        0.1, ge=0, description="Decoupled weight decay, every optimizer: theta <- theta - lr_t * "
        "weight_decay * theta (scaled by the scheduled lr); never on norms, biases, position tables, "
        "temperature."
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.98), description="adamw: Adam's (beta1, beta2). lion: (beta1 = interpolation of the update's "
        "sign, beta2 = momentum decay); the Lion paper uses (0.9, 0.99). adafactor_bv: betas[0] is its "
        "momentum, betas[1] is unused. adafactor: unused."
    )
    eps: float = Field(1e-6, gt=0, description="Adam epsilon (adamw only; the others keep their own).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps before cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of the peak.")
    grad_clip: float | None = Field(1.0, gt=0, description="Global gradient-norm clip; None disables.")


class TrainConfig(Frozen):
    """One training run: batch geometry, length, precision, seeds."""

    global_batch: int = Field(256, gt=0, description="Global contrastive batch B (all workers together).")
    micro_batch_size: int = Field(64, gt=0, description="Image micro-batch of the gradient cache.")
    text_micro_batch_size: int | None = Field(
        None, gt=0, description="Text micro-batch (defaults to micro_batch_size)."
    )
    steps: int = Field(100, gt=0, description="Optimizer steps.")
    seed: int = Field(0, description="Seed of parameters, data order and dropout.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker (CPU runs set DS_ACCELERATOR=cpu).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each Ray Train worker reserves.")
    threads_per_worker: int | None = Field(
        None, gt=0, description="torch intra-op threads per worker; None = ceil(cpus_per_worker)."
    )
    max_skipped_steps: int = Field(
        3, ge=0, description="Consecutive non-finite steps (loss or gradient norm NaN/inf) skipped "
        "without an update before the run stops with an error; 0 stops at the first one."
    )


class EvalConfig(Frozen):
    """Zero-shot evaluation during and after training (and `scalelab eval`)."""

    sets: dict[str, str] = Field(
        default_factory=dict,
        description="Zero-shot sets: name -> ImageFolder dir (<class>/<image>; classnames.txt or the folder "
        "names; templates.txt with {} or {c} placeholders, or the shared `templates` file).",
    )
    templates: str | None = Field(
        None, description="Shared prompt-templates file for the sets that have no templates.txt of their own."
    )
    shifted: list[str] = Field(
        default_factory=list, description="Names in `sets` that form the robustness suite (averaged)."
    )
    retrieval: str | None = Field(None, description="Held-out pair dataset for image<->text recall@k.")
    every_steps: int | None = Field(
        None, gt=0, description="Evaluate every this many steps; None = only at the end."
    )
    batch_size: int = Field(256, gt=0, description="Encoding batch size of the evaluation.")

    @model_validator(mode="after")
    def _names(self) -> EvalConfig:
        unknown = [s for s in self.shifted if s not in self.sets]
        if unknown:
            raise ValueError(f"eval.shifted names {unknown} not in eval.sets {sorted(self.sets)}")
        bad = [s for s in self.sets if not s or "/" in s or s == "robustness_avg"]
        if bad:
            raise ValueError(f"eval.sets names become metric keys: no '/', not 'robustness_avg'; got {bad}")
        return self


class ClassifyConfig(Frozen):
    """The supervised image-tower stage (`task: classify`; BASIC's pre-training on JFT labels)."""

    head: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="'softmax': cross-entropy over the classes, one label per image. 'sigmoid': "
        "one binary cross-entropy per class, summed over classes and averaged over images (big_vision's "
        "JFT recipe), for multi-label data."
    )
    eval_sets: dict[str, str] = Field(
        default_factory=dict, description="Held-out labelled splits: name -> ImageFolder dir "
        "(<class>/<image>, class folders in sorted order = label indices 0..num_classes-1). Metrics "
        "eval/classify/<name>/top1 and /top5, every eval.every_steps and at the end."
    )

    @model_validator(mode="after")
    def _names(self) -> ClassifyConfig:
        bad = [s for s in self.eval_sets if not s or "/" in s]
        if bad:
            raise ValueError(f"classify.eval_sets names become metric keys: no '/'; got {bad}")
        return self


class RunSettings(Frozen):
    """Where a run keeps its state and how often it reports; none of this changes the trained model."""

    storage: str = Field(
        "./runs", description="Storage root: checkpoints, MLflow store, artifacts (resolved to absolute)."
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None = env MLFLOW_TRACKING_URI, else sqlite under storage."
    )
    mlflow_experiment: str = Field("scalelab", description="MLflow experiment the run belongs to.")
    log_every: int = Field(10, gt=0, description="Log training metrics every this many steps.")
    checkpoint_every: int | None = Field(
        50, gt=0, description="Checkpoint every this many steps (and always at the end); None = end only."
    )
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept on storage (the latest ones).")
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the last checkpoint; -1 = no limit."
    )


class ExperimentConfig(Frozen):
    """Everything one training run needs."""

    name: str = Field(
        "experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9._=-]*$", max_length=200,
        description="Run name: its checkpoint folder under run.storage and its MLflow run are found by it.",
    )
    task: Literal["contrastive", "classify"] = Field(
        "contrastive", description="'contrastive': the dual encoder on image-text pairs (gradient cache). "
        "'classify': the image tower plus a linear head on labelled images (data.labels, classify)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    run: RunSettings = Field(default_factory=RunSettings)

    @model_validator(mode="after")
    def _batch_geometry(self) -> ExperimentConfig:
        t = self.train
        if t.global_batch % t.num_workers:
            raise ValueError(
                f"train.global_batch={t.global_batch} must be divisible by train.num_workers={t.num_workers}"
            )
        return self

    @model_validator(mode="after")
    def _task_sections(self) -> ExperimentConfig:
        labels = self.data.labels
        if self.task == "contrastive":
            if labels is not None or self.classify.eval_sets:
                raise ValueError("data.labels and classify.eval_sets belong to task: classify "
                                 "(task is contrastive)")
            return self
        if labels is None:
            raise ValueError("task: classify needs data.labels (at least `data: {labels: {field: label}}`): "
                             "which json key of each sample holds its class index")
        if self.eval.sets or self.eval.retrieval:
            raise ValueError("eval.sets / eval.retrieval are zero-shot evaluations of a dual encoder; task "
                             "classify evaluates top-1 on classify.eval_sets")
        if self.model.image != ImageTrainConfig():
            raise ValueError("model.image (init, lock, unlock_at_step, lr_mult) configures the contrastive "
                             "stage's image tower; task classify trains its tower from random init")
        if self.classify.head == "softmax" and labels.max_labels > 1:
            raise ValueError(f"classify.head=softmax takes one label per image but data.labels.max_labels="
                             f"{labels.max_labels}: use classify.head: sigmoid for multi-label data")
        return self


# --------------------------------------------------------------------------- YAML and overrides
def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn ['a.b=1', 'c=[1,2]'] into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"override {item!r} has an empty key segment")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def apply_overrides(data: Mapping[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """Apply `--set a.b=value` overrides to a nested dict."""
    return deep_merge(data, parse_overrides(items))


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: the dotted field path, what was given, and what is allowed."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        where = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; allowed fields are listed by the config's schema)"
            parent = _model_at(err.title, e["loc"][:-1])
            if parent is not None:
                msg = f"unknown field; allowed: {', '.join(sorted(parent.model_fields))}"
        elif e["type"] not in {"value_error", "assertion_error"} and "input" in e:
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def _model_at(title: str, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Find the config class at a location inside the model named `title` (for 'allowed' lists)."""
    cls = _config_classes().get(title)
    for part in loc:
        if isinstance(part, int) and cls is not None:
            continue  # an index into a list field: the element class was resolved below
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return None
        cls = _config_class_of(cls.model_fields[part].annotation)
    return cls


def _config_class_of(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds, directly or as list elements / optional value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _config_class_of(arg)
        if found is not None:
            return found
    return None


def _config_classes() -> dict[str, type[BaseModel]]:
    """Every config class by name, including those defined in other modules (e.g. the sweep config)."""
    found: dict[str, type[BaseModel]] = {}
    todo: list[type[BaseModel]] = [Frozen]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def validate(cls: type[Frozen], data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build `cls` from a dict, turning pydantic's error into one clear ConfigError."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(f"invalid {cls.__name__}: {format_validation_error(err, prefix)}") from None


def load_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file → {}); ConfigError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_experiment(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML (or the defaults when `path` is None) and apply dot overrides."""
    data = load_yaml_mapping(path) if path is not None else {}
    return validate(ExperimentConfig, apply_overrides(data, overrides))


def resolve_paths(cfg: ExperimentConfig, base: str | Path | None = None) -> ExperimentConfig:
    """`cfg` with every filesystem path made absolute against `base` (default: the current directory).

    Done once in the driver: Ray workers and job submissions run in other working directories, where a
    relative path would name a different (or no) folder. URIs (`s3://...`) are left alone.
    """
    root = Path.cwd() if base is None else Path(base)

    def absolute(path: str | None) -> str | None:
        if path is None or "://" in path:
            return path
        return str((root / Path(path).expanduser()).resolve())

    data = cfg.data.model_copy(update={
        "sources": [s.model_copy(update={"path": absolute(s.path)}) for s in cfg.data.sources],
        "tokenizer": absolute(cfg.data.tokenizer),
    })
    evaluation = cfg.eval.model_copy(update={
        "sets": {name: absolute(d) for name, d in cfg.eval.sets.items()},
        "retrieval": absolute(cfg.eval.retrieval),
        "templates": absolute(cfg.eval.templates),
    })
    classify = cfg.classify.model_copy(update={
        "eval_sets": {name: absolute(d) for name, d in cfg.classify.eval_sets.items()},
    })
    run = cfg.run.model_copy(update={"storage": absolute(cfg.run.storage)})
    image = cfg.model.image.model_copy(update={"init": absolute(cfg.model.image.init)})
    model = cfg.model.model_copy(update={"image": image})
    return cfg.model_copy(update={"data": data, "eval": evaluation, "classify": classify, "run": run,
                                  "model": model})


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value}; lists and tuples become strings (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[name] = str(list(value) if not isinstance(value, Mapping) else dict(value))
        else:
            flat[name] = value
    return flat
