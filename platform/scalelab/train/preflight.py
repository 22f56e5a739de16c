"""Checks that refuse a run before Ray starts: every path, model/data agreement, and resume compatibility.

Pydantic already refused malformed values (unknown fields, ZeRO 5, batch not divisible by workers);
this module checks what needs the filesystem or several sections at once. Everything raises
`ConfigError` with the field, the value and what to do. Imports no framework (fast, testable alone).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from scalelab import storage
from scalelab.config import ConfigError, ExperimentConfig
from scalelab.train.checkpoint import RunState
from scalelab.train.ds_config import batch_geometry, deepspeed_config
from scalelab.train.resume import RESUMABLE_CHANGES, decide_resume, run_dir

__all__ = [
    "RESUMABLE_CHANGES",
    "check_experiment",
    "check_resources",
    "check_resume",
    "local_capacity",
    "refuse_short_resources",
    "run_dir",
    "run_reservation",
    "starts_local_ray",
]

def check_experiment(cfg: ExperimentConfig) -> None:
    """Everything a worker would otherwise discover minutes later (`cfg` with absolute paths)."""
    from scalelab.models import get_spec

    spec = get_spec(cfg.model.preset, **cfg.model.overrides)  # unknown preset → ConfigError
    _check_geometry(cfg)
    _check_schedule(cfg)
    _check_optimizer(cfg)
    if cfg.task == "classify":
        from scalelab.train.preflight_classify import check_classify

        check_classify(cfg, spec)
    else:
        _check_data(cfg, spec)
        _check_eval(cfg)
    _check_storage(cfg)


def _check_geometry(cfg: ExperimentConfig) -> None:
    """Batch / micro-batch / worker geometry, and the DeepSpeed config built from it."""
    geometry = batch_geometry(cfg.train, cfg.train.num_workers)
    deepspeed_config(cfg.train, cfg.optim, micro_batches=geometry.backward_calls,
                     world_size=cfg.train.num_workers)


def _check_schedule(cfg: ExperimentConfig) -> None:
    """Warm-up + cosine needs at least one cosine step: checked at the first and the last step."""
    from scalelab.train.schedule import lr_for

    if cfg.optim.warmup_steps >= cfg.train.steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} must be below train.steps={cfg.train.steps} "
            "(the cosine phase would be empty): lower optim.warmup_steps or raise train.steps"
        )
    for step in (0, cfg.train.steps - 1):
        try:
            lr_for(step, cfg.optim, cfg.train.steps)
        except ValueError as err:
            raise ConfigError(f"optim: {err}") from None


def _check_optimizer(cfg: ExperimentConfig) -> None:
    """Build the optimizer over the model's parameter groups on the meta device (no memory): torch's
    own argument checks (betas in [0, 1), eps, lr) run here instead of in every worker. The image
    tower's pretrained weights (`model.image.init`) are read and matched against it here too."""
    import torch

    from scalelab.models import model_for
    from scalelab.train.image_tower import check_image_init, prepare_model
    from scalelab.train.optim import build_optimizer

    with torch.device("meta"):
        model = model_for(cfg)
    if cfg.task == "contrastive":
        check_image_init(cfg, model)  # model.image.init: the path, its format, its keys and shapes
        prepare_model(model, cfg, load_weights=False)  # the groups training builds (locked, lr_mult)
    try:
        build_optimizer(model, cfg.optim)
    except ValueError as err:
        raise ConfigError(f"optim ({cfg.optim.name}): {err}") from None


def _check_data(cfg: ExperimentConfig, spec: Any) -> None:
    from scalelab.data.manifest import Manifest
    from scalelab.data.plan import select_subset
    from scalelab.data.tokenizer import load_tokenizer, tokenizer_path

    for i, source in enumerate(cfg.data.sources):
        try:
            Manifest.load(source.path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.sources[{i}].path: {err}") from None
    try:
        tokenizer = load_tokenizer(tokenizer_path(cfg.data))
    except FileNotFoundError as err:
        raise ConfigError(f"data.tokenizer: {err}") from None
    except Exception as err:  # not a tokenizer file: the tokenizers library raises a bare Exception
        raise ConfigError(f"data.tokenizer: {tokenizer_path(cfg.data)} is not a tokenizer ({err})") from None
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


def _check_eval(cfg: ExperimentConfig) -> None:
    """Every zero-shot set loads as evaluation will load it (minus the pixels), and the retrieval set
    is a readable pair dataset: a bad eval folder must not surface after hours of training."""
    for name, directory in cfg.eval.sets.items():
        try:
            _check_image_folder(Path(directory), cfg.eval.templates)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"eval.sets.{name}: {err}") from None
    if cfg.eval.templates and not Path(cfg.eval.templates).is_file():
        raise ConfigError(f"eval.templates: no such file {cfg.eval.templates}")
    if cfg.eval.retrieval:
        from scalelab.data.manifest import Manifest

        try:
            manifest = Manifest.load(cfg.eval.retrieval)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"eval.retrieval: {err}") from None
        missing = [p for p in manifest.shard_paths(cfg.eval.retrieval) if not Path(p).is_file()]
        if missing:
            raise ConfigError(f"eval.retrieval: {len(missing)} shard(s) listed in its manifest are missing, "
                              f"e.g. {missing[0]}")


def _check_image_folder(root: Path, shared_templates: str | None) -> None:
    from scalelab.data.prompts import class_folders, read_templates, resolve_classnames, templates_file
    from scalelab.eval.datasets import IMAGE_SUFFIXES

    if not root.is_dir():
        raise FileNotFoundError(f"eval set directory not found: {root}")
    folders = class_folders(root)
    if not folders:
        raise ValueError(f"{root} has no class sub-folders (an eval set is <dir>/<class>/<image>)")
    resolve_classnames(root, folders)
    read_templates(templates_file(root, shared_templates))
    images = [p for f in folders for p in sorted(f.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ValueError(f"{root}: no images ({'/'.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    from PIL import Image, UnidentifiedImageError

    for path in images:  # headers only (Pillow opens lazily): cheap even for ImageNet-sized sets
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path} is not a readable image ({err}); remove or replace it") from None


def _check_storage(cfg: ExperimentConfig) -> None:
    """The storage root must take files: checkpoints and the MLflow store go there."""
    if storage.is_uri(cfg.run.storage):
        _check_storage_uri(cfg)
        return
    root = Path(cfg.run.storage)
    existing = next(p for p in (root, *root.parents) if p.exists())  # nothing is created by a check
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".scalelab-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"run.storage: {root} is not writable ({err.strerror or err}); "
                          "choose another storage root") from None


def _check_storage_uri(cfg: ExperimentConfig) -> None:
    """A storage URI: the MLflow store named elsewhere (it cannot live on an object store), and the
    filesystem reachable and writable with the credentials of this environment (a marker written and
    removed, as Ray Train does when it starts)."""
    from scalelab.tracking import resolve_tracking_uri

    resolve_tracking_uri(cfg.run.tracking_uri, cfg.run.storage)  # ConfigError without one
    marker = storage.join(cfg.run.storage, ".scalelab-write-test")
    try:
        storage.write_text(marker, "")
        storage.delete(marker)
    except (OSError, ValueError) as err:  # pyarrow: OSError for access/network, ValueError for the URI
        raise ConfigError(f"run.storage: {storage.describe(cfg.run.storage)} cannot be written ({err}); "
                          "check the URI, the credentials in the environment (AWS_ACCESS_KEY_ID, ...) "
                          "and the endpoint (AWS_ENDPOINT_URL or ?endpoint_override=)") from None


# --------------------------------------------------------------------------- resources
def run_reservation(cfg: ExperimentConfig, extra_cpus: float = 0.0) -> dict[str, float]:
    """What one run holds in Ray at once: every worker, plus one decode task of its data stream (each
    rank streams its own dataset, and Ray Data needs one task's CPUs to make any progress)."""
    t = cfg.train
    cpus = t.num_workers * (t.cpus_per_worker + cfg.data.decode_cpus) + extra_cpus
    return {"CPU": round(cpus, 6), "GPU": float(t.num_workers if t.use_gpu else 0)}


def local_capacity() -> dict[str, float]:
    """This machine as a local Ray instance sees it (`ensure_ray` starts it with these CPUs)."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def check_resources(cfg: ExperimentConfig, capacity: dict[str, float], where: str,
                    extra_cpus: float = 0.0) -> list[str]:
    """The resources `run_reservation` lacks on `capacity`, as sentences (empty when it fits)."""
    need = run_reservation(cfg, extra_cpus)
    t, d = cfg.train, cfg.data
    short = []
    if need["CPU"] > capacity.get("CPU", 0.0) + 1e-9:
        short.append(
            f"{t.num_workers} worker(s) × (train.cpus_per_worker={t.cpus_per_worker} + data.decode_cpus="
            f"{d.decode_cpus} for one decode task){' + ' + str(extra_cpus) if extra_cpus else ''} = "
            f"{need['CPU']:g} CPUs, but {where} has {capacity.get('CPU', 0.0):g}: lower "
            "train.cpus_per_worker or data.decode_cpus (fractions are fine), or use fewer workers"
        )
    if need["GPU"] > capacity.get("GPU", 0.0):
        short.append(f"{t.num_workers} worker(s) with train.use_gpu need {need['GPU']:g} GPUs, but {where} "
                     f"has {capacity.get('GPU', 0.0):g}: set train.use_gpu=false or use fewer workers")
    return short


def refuse_short_resources(cfg: ExperimentConfig, capacity: dict[str, float], where: str,
                           extra_cpus: float = 0.0) -> None:
    """ConfigError when the run cannot fit `capacity`: Ray would otherwise wait for it forever."""
    short = check_resources(cfg, capacity, where, extra_cpus)
    if short:
        raise ConfigError("; ".join(short))


def starts_local_ray(address: str | None) -> bool:
    """Whether `ensure_ray(address)` will start a new Ray instance on this machine (as far as can be
    told without starting Ray: an address, RAY_ADDRESS or a `ray start` cluster here means no)."""
    if address == "local":
        return True
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    return not (Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster").is_file()


def check_resume(cfg: ExperimentConfig) -> RunState | None:
    """The state of the run's latest checkpoint (None for a new run), refusing incompatible re-runs
    (`resume.decide_resume` decides; this is its preflight view)."""
    return decide_resume(cfg).state
