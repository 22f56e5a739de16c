"""DeepSpeed engine adapter: wrap a single-device DualEncoder and a torch optimizer in a ZeRO engine.

The process group is created before this is called: by Ray Train inside a worker (gloo on CPU, nccl
on GPU), or by a test. `deepspeed.init_distributed` then reuses it instead of creating a second one.
On CPU, `DS_ACCELERATOR=cpu` must be set in the environment before deepspeed is imported (the worker's
runtime env), and the first init JIT-compiles a small communication op once per machine (~60 s).

The optimizer is a torch one from `build_optimizer`, passed in: a DeepSpeed config "optimizer" section
would JIT-build DeepSpeed's own fused ops, and the learning rate is set each step by `schedule.apply_lr`
(no DeepSpeed scheduler). `gradient_accumulation_steps` is the gradient cache's number of backward
calls per rank per step (`batch_geometry(...).backward_calls`), so that DeepSpeed's accumulation
boundary coincides with the last replayed micro-batch (`step.train_step`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scalelab.config import ExperimentConfig
from scalelab.train.ds_config import batch_geometry, deepspeed_config
from scalelab.train.optim import build_optimizer

__all__ = ["begin_micro_step", "build_engine", "zero_stage"]


def build_engine(model: nn.Module, cfg: ExperimentConfig, *, world_size: int) -> tuple[Any, Any]:
    """`(engine, optimizer)` from `deepspeed.initialize` for `model` under `cfg` on `world_size` ranks.

    `world_size` must equal the process group's size (checked): the batch geometry, and therefore the
    accumulation boundary, depends on it. `model` is changed in place: its 0-dim parameters become
    one-element vectors (`_scalars_to_vectors`: DeepSpeed bugs). The returned optimizer is DeepSpeed's
    wrapper (ZeRO-1/2/3, bf16) or the torch optimizer itself (ZeRO-0 fp32); `apply_lr` works on either.
    """
    import deepspeed  # deferred: importing deepspeed is slow and reads DS_ACCELERATOR

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        actual = torch.distributed.get_world_size()
        if actual != world_size:
            raise ValueError(f"world_size={world_size} but the process group has {actual} ranks")
    elif world_size != 1:
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed process group")
    # Reuses an existing process group; with none (one process) it creates a single-rank gloo group.
    deepspeed.init_distributed(dist_backend="gloo" if _on_cpu() else None)

    geometry = batch_geometry(cfg.train, world_size)
    config = deepspeed_config(
        cfg.train, cfg.optim, micro_batches=geometry.backward_calls, world_size=world_size
    )
    _scalars_to_vectors(model)
    optimizer = build_optimizer(model, cfg.optim)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, ds_optimizer


def begin_micro_step(engine: Any) -> None:
    """Do the per-micro-step bookkeeping `engine.forward` would do; call before each `engine.backward`.

    The gradient cache runs the model's encoders directly (`engine.module.encode_image`), never
    `engine(...)`. But `DeepSpeedEngine.forward` is where a ZeRO optimizer learns that a new micro-step
    began (`optimizer.clear_backward_seen_flag()`); ZeRO-3 advances its `micro_step_id` there, and with
    `micro_step_id` stuck at 0 every backward *overwrites* the partitioned gradient instead of adding
    to it, so only the last micro-batch's gradient survives (caught by tests/train/test_engine.py).
    """
    clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
    if callable(clear):
        clear()


def zero_stage(engine: Any) -> int:
    """The ZeRO stage the engine actually runs (0 when ZeRO is off)."""
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


def _scalars_to_vectors(model: nn.Module) -> list[str]:
    """Give every 0-dim parameter shape [1], in place; returns their names.

    DeepSpeed 0.19.8 mishandles 0-dim parameters (here `logit_scale`, and `logit_bias` when present)
    in three places: the engine's initial parameter broadcast and ZeRO-3's partitioning broadcast both
    send `p.data.view(torch.uint8)`, which raises "self.dim() cannot be 0 to view Float as Byte" when
    world_size > 1, and ZeRO-0's gradient clipping does `p.grad.mul_(coef)` with a [1]-shaped coef,
    which raises "output with shape [] doesn't match the broadcast shape [1]". A one-element vector
    avoids all three. Everything downstream reads the temperature through one-element-tolerant ops
    (`.exp()`, `.item()`, broadcasting), and a checkpoint written from the engine still loads into a
    freshly built model: torch's `load_state_dict` accepts a [1] entry for a 0-dim parameter.
    """
    names = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 0:
                param.data = param.data.reshape(1)
                names.append(name)
    return names


def _on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"
