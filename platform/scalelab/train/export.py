"""`scalelab export`: a training checkpoint folder → a plain directory any torch program can load.

An exported model is a directory of three files (no DeepSpeed, Ray or MLflow needed to read it;
`scalelab.eval.load_exported` is the reader):

    model.pt         fp32 state dict of plain tensors in the model's own shapes (DualEncoder, strict)
    config.json      {"format", "experiment": resolved ExperimentConfig, "model": resolved ModelSpec,
                      "step", "samples_seen", "source": the checkpoint folder, "weights": how they were read}
    tokenizer.json   the run's tokenizer (copied from `tokenizer_path(cfg.data)`)

A `task: classify` run exports its `ImageClassifier` the same way (model.pt holds `image_tower.*`, the
keys a DualEncoder of the same preset loads, and `head.*`; config.json adds "task", "num_classes" and
"head"), without tokenizer.json: it read no captions. `load_exported` reads dual encoders only.

Where the fp32 weights come from depends on what DeepSpeed 0.19.8 wrote under `deepspeed/state/`:
- ZeRO-1/2/3 (fp32 or bf16): `*_optim_states.pt` per rank hold the fp32 master partitions; DeepSpeed's
  own `zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` stitches them back (ZeRO-3's
  `zero_pp_rank_*_model_states.pt` hold only placeholders, its module weights exist nowhere else).
- ZeRO-0 fp32: no optimizer wrapper, no master copy; `mp_rank_00_model_states.pt["module"]` are the
  trained fp32 weights themselves.
- ZeRO-0 bf16: DeepSpeed wraps the torch optimizer in `FP16_UnfusedOptimizer` (bf16 model, fp32
  masters); `["module"]` is bf16, while `["optimizer"]["fp32_groups"]` holds the fp32 masters as lists in
  the order of the torch optimizer's parameter groups. They are matched to names by rebuilding the
  same groups (`optim.param_groups` on a fresh model). Were they missing, the bf16 module would be cast
  to fp32 (`weights: "module_bf16_cast"`), which loses the low mantissa bits of the masters.
Training evaluates the same weights: the optimizer's fp32 masters where there are any (ZeRO-1/2/3, and
ZeRO-0 bf16's wrapper, read by `engine.fp32_master`) and the fp32 module under ZeRO-0 fp32, so an export
scores what the run's final evaluation reported.

`build_engine` gives 0-dim parameters (the temperature) shape [1]; export restores the model's shapes.
`read_checkpoint_weights` is the reading half on its own (`model.image.init` takes a run's image tower
from it). Parameters a run kept frozen (a locked image tower) have no master copy: `zero_to_fp32`
returns them under ZeRO-2/3, the module states hold them under ZeRO-0/1 (`_with_frozen_parameters`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalelab import storage
from scalelab.config import ExperimentConfig, validate
from scalelab.train.checkpoint import DS_SUBDIR, DS_TAG, RunState, read_run_state

__all__ = ["CONFIG_NAME", "EXPORT_FORMAT", "MODEL_NAME", "TOKENIZER_NAME", "CheckpointWeights",
           "export_checkpoint", "is_exported", "read_checkpoint_weights"]

MODEL_NAME = "model.pt"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
EXPORT_FORMAT = 1
_MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-0/1/2 module file (tensor parallel rank 0)


def is_exported(directory: str | Path) -> bool:
    """Whether `directory` holds an exported model (model.pt, config.json and tokenizer.json)."""
    d = Path(directory)
    return all((d / name).is_file() for name in (MODEL_NAME, CONFIG_NAME, TOKENIZER_NAME))


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the fp32 model of training checkpoint folder `checkpoint` into directory `out`; returns `out`.

    Raises FileNotFoundError naming the path when `checkpoint` is not a scalelab checkpoint (no
    scalelab.json, or no DeepSpeed state) or the run's tokenizer file is gone.
    """
    from scalelab.data.tokenizer import tokenizer_path
    from scalelab.models import get_spec

    if storage.is_uri(checkpoint):  # on a storage URI (s3://...): export a downloaded copy
        with storage.local_copy(checkpoint, prefix="scalelab-export-") as local:
            return _with_source(export_checkpoint(local, out), storage.describe(checkpoint))
    checkpoint, out = Path(checkpoint), Path(out)
    weights = read_checkpoint_weights(checkpoint)
    cfg, run = weights.config, weights.run
    classify = cfg.task == "classify"
    tokenizer = None if classify else tokenizer_path(cfg.data)

    out.mkdir(parents=True, exist_ok=True)
    partial = out / (MODEL_NAME + ".partial")
    torch.save(weights.state, partial)
    os.replace(partial, out / MODEL_NAME)  # a crash never leaves a truncated model.pt behind
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER_NAME)
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "experiment": cfg.to_dict(),
        "model": get_spec(cfg.model.preset, **cfg.model.overrides).to_dict(),
        "step": run.step,
        "samples_seen": run.samples_seen,
        "source": str(checkpoint.resolve()),
        "weights": weights.source,
    }
    if classify:
        meta.update(task="classify", num_classes=cfg.data.labels.num_classes, head=cfg.classify.head)
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out


@dataclass(frozen=True)
class CheckpointWeights:
    """A checkpoint's fp32 weights as `export_checkpoint` writes them, and where they came from."""

    state: dict[str, torch.Tensor]  # plain fp32 tensors in the model's own shapes, strict-loadable
    config: ExperimentConfig
    run: RunState
    source: str  # "zero_to_fp32", "module", "fp32_groups" or "module_bf16_cast" (module docstring)


def read_checkpoint_weights(checkpoint: str | Path) -> CheckpointWeights:
    """The fp32 weights of training checkpoint folder `checkpoint` (no files written).

    Raises FileNotFoundError naming the path when it is not a complete scalelab checkpoint.
    """
    from scalelab.models import model_for
    from scalelab.train.image_tower import prepare_model

    checkpoint = Path(checkpoint)
    run = read_run_state(checkpoint)
    ds_dir = checkpoint / DS_SUBDIR
    if not (ds_dir / DS_TAG).is_dir():
        raise FileNotFoundError(f"{checkpoint} is not a complete scalelab checkpoint (no {ds_dir / DS_TAG})")
    cfg = validate(ExperimentConfig, run.config)
    # Laid out as training laid it out (frozen tower, its own groups): the bf16 masters are matched by
    # the optimizer's groups. Its init weights are not needed, the checkpoint holds the trained ones.
    model = model_for(cfg)  # the dual encoder, or the classifier of a `task: classify` run
    if cfg.task == "contrastive":
        model = prepare_model(model, cfg, load_weights=False)
    raw, source = _fp32_weights(ds_dir / DS_TAG, model, cfg)
    state = _in_model_shapes(raw, model)
    model.load_state_dict(state, strict=True)  # refuse anything the run's model cannot load
    return CheckpointWeights(state, cfg, run, source)


def _fp32_weights(tag_dir: Path, model: nn.Module, cfg: ExperimentConfig) -> tuple[dict[str, Any], str]:
    """(state dict as DeepSpeed saved it, where it came from); see the module docstring per case."""
    if any(tag_dir.glob("*_optim_states.pt")):  # ZeRO-1/2/3: partitioned fp32 masters
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # It prints its progress to stdout, which would corrupt `scalelab eval --json`: swallow it.
        with contextlib.redirect_stdout(io.StringIO()):
            state = dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))
        return _with_frozen_parameters(state, tag_dir, model), "zero_to_fp32"
    states_file = tag_dir / _MODEL_STATES
    if not states_file.is_file():
        raise FileNotFoundError(f"no DeepSpeed module states in {tag_dir} (expected {_MODEL_STATES})")
    # weights_only=False: DeepSpeed pickles its own config objects next to the tensors.
    saved = torch.load(states_file, map_location="cpu", weights_only=False)
    module = dict(saved["module"])
    optimizer = saved.get("optimizer")
    if not any(torch.is_floating_point(v) and v.dtype != torch.float32 for v in module.values()):
        return module, "module"  # ZeRO-0 fp32: the module weights are the only (and exact) copy
    if isinstance(optimizer, dict) and optimizer.get("fp32_groups"):
        return _masters_by_name(module, optimizer["fp32_groups"], model, cfg), "fp32_groups"
    return module, "module_bf16_cast"


def _with_frozen_parameters(state: dict[str, Any], tag_dir: Path, model: nn.Module) -> dict[str, Any]:
    """Add the frozen parameters (a locked image tower) `zero_to_fp32` leaves out under ZeRO-1.

    DeepSpeed 0.19.8 writes frozen parameters beside the optimizer partitions only when it partitions
    gradients (ZeRO-2/3). Under ZeRO-1 the module states hold every parameter whole, and a frozen one
    has no master copy that could differ from it: that value is the trained (untouched) one.
    """
    missing = [name for name in model.state_dict() if name not in state]
    if missing and (tag_dir / _MODEL_STATES).is_file():
        module = torch.load(tag_dir / _MODEL_STATES, map_location="cpu", weights_only=False)["module"]
        state.update({name: module[name] for name in missing if name in module})
    return state


def _masters_by_name(module: dict[str, Any], fp32_groups: list[list[torch.Tensor]], model: nn.Module,
                     cfg: ExperimentConfig) -> dict[str, Any]:
    """Name the ZeRO-0 bf16 optimizer's fp32 masters; unoptimized parameters keep the module value."""
    from scalelab.train.optim import param_groups

    names = {id(p): n for n, p in model.named_parameters()}
    # The engine's groups are built after its scalars became [1]-vectors; the grouping rules look at
    # names and ndim <= 1, so a fresh model groups the same parameters in the same order.
    groups = param_groups(model, cfg.optim.weight_decay)
    ordered = [[names[id(p)] for p in g["params"] if p.requires_grad and p.numel() > 0] for g in groups]
    saved_sizes, model_sizes = [len(g) for g in fp32_groups], [len(g) for g in ordered]
    if saved_sizes != model_sizes:
        raise ValueError(f"the checkpoint's optimizer groups hold {saved_sizes} parameters, the model's "
                         f"{model_sizes}: was it written by another model?")
    out = dict(module)
    for group_names, group in zip(ordered, fp32_groups, strict=True):
        for name, master in zip(group_names, group, strict=True):
            if master.numel() != module[name].numel():
                raise ValueError(f"fp32 master of {name} has {master.numel()} elements, "
                                 f"the module {module[name].numel()}")
            out[name] = master.detach()
    return out


def _in_model_shapes(raw: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain contiguous fp32 tensors in the model's own shapes (undoes `_scalars_to_vectors`)."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(raw)), sorted(set(raw) - set(expected))
    if missing or extra:
        raise ValueError(f"checkpoint weights do not match the model: missing {missing}, unexpected {extra}")
    out = {}
    for name, ref in expected.items():
        value = torch.as_tensor(raw[name]).detach()
        if value.numel() != ref.numel():
            raise ValueError(f"{name}: checkpoint has {tuple(value.shape)}, the model {tuple(ref.shape)}")
        value = value.reshape(ref.shape)
        if torch.is_floating_point(value):
            value = value.float()
        out[name] = value.clone().contiguous()  # own storage: no views into DeepSpeed's flat buffers
    return out


def _with_source(out: Path, source: str) -> Path:
    """`config.json`'s `source` set to the checkpoint on storage (not the temporary copy exported)."""
    meta = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**meta, "source": source}, indent=1, sort_keys=True))
    return out
