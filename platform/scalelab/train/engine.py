"""DeepSpeed engine adapter: wrap a single-device DualEncoder and a torch optimizer in a ZeRO engine.

The process group is created before this is called: by Ray Train inside a worker (gloo on CPU, nccl
on GPU), or by a test. `deepspeed.init_distributed` then reuses it instead of creating a second one.
On CPU, `DS_ACCELERATOR=cpu` must be set in the environment before deepspeed is imported (the worker's
runtime env). DeepSpeed's communication backend would JIT-compile its shared-memory all-reduce op
(`deepspeed_shm_comm`) when it starts: ~27 s on 2 cores on a machine's first run, and again whenever a
process finds another `ninja` first on its PATH (the venv's vs the system's: a Ray job's workers). Only
DeepSpeed-Inference's all-reduce uses that op, never training, so it is marked unavailable here
(`_skip_inference_comm_op`) and nothing is compiled.

The optimizer is a torch one from `build_optimizer`, passed in: a DeepSpeed config "optimizer" section
would JIT-build DeepSpeed's own fused ops, and the learning rate is set each step by `schedule.apply_lr`
(no DeepSpeed scheduler). `gradient_accumulation_steps` is the gradient cache's number of backward
calls per rank per step (`batch_geometry(...).backward_calls`), so that DeepSpeed's accumulation
boundary coincides with the last replayed micro-batch (`step.train_step`).

At ZeRO-0 with bf16, DeepSpeed wraps the torch optimizer in `FP16_UnfusedOptimizer`, which keeps one fp32
master per parameter (`fp32_groups`, aligned with the bf16 `fp16_groups`). DeepSpeed's own accessors
(`deepspeed.utils.safe_get_full_fp32_param` / `safe_set_full_fp32_param`) do not see those masters (they
return None / do nothing), so `fp32_master` / `set_fp32_master` read and write them directly. That
wrapper's constructor also steps the torch optimizer once with zero gradients to create its state: Adam's
step count starts at 1 (its first real update is ~0.74 of ZeRO-2's, bias corrections stay one step
ahead) and the masters are weight-decayed once at the peak lr. `build_engine` undoes that step
(`_undo_state_init_step`), so every stage starts from the same optimizer state.

`optimizer_step` replaces a bare `engine.step()`: a step whose global gradient norm is NaN/inf leaves
parameters, fp32 master copies and optimizer state (Adam moments, step count) untouched on every rank
and discards the step's gradients, so the next step starts clean (module docstring of `step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scalelab.config import ExperimentConfig
from scalelab.train.ds_config import batch_geometry, deepspeed_config
from scalelab.train.optim import build_optimizer

__all__ = [
    "StepOutcome",
    "begin_micro_step",
    "build_engine",
    "fp32_master",
    "optimizer_step",
    "set_fp32_master",
    "zero_stage",
]


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
    _skip_inference_comm_op()
    # Reuses an existing process group; with none (one process) it creates a single-rank gloo group.
    deepspeed.init_distributed(dist_backend="gloo" if _on_cpu() else None)

    geometry = batch_geometry(cfg.train, world_size)
    config = deepspeed_config(
        cfg.train, cfg.optim, micro_batches=geometry.backward_calls, world_size=world_size
    )
    _scalars_to_vectors(model)
    optimizer = build_optimizer(model, cfg.optim)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    _undo_state_init_step(engine.optimizer)
    return engine, ds_optimizer


def fp32_master(engine: Any, param: torch.Tensor) -> torch.Tensor | None:
    """A full copy of the optimizer's fp32 master of `param` (module docstring); None where the optimizer
    steps `param` itself (ZeRO-0 fp32) or not at all (frozen). Collective under ZeRO-1/2/3."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is None:
        master = _unfused_master(engine.optimizer, param)
        master = None if master is None else master.detach().clone()
    return master


def set_fp32_master(engine: Any, param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite the optimizer's fp32 master of `param` with `value` (full, unpartitioned); no-op where
    there is none. Not for ZeRO-3 (`safe_set_full_fp32_param` mishandles a padded partition in 0.19.8:
    step.clamp_temperature)."""
    from deepspeed.utils import safe_set_full_fp32_param

    live = _unfused_master(engine.optimizer, param)
    if live is not None:
        live.data.copy_(value.reshape(live.shape))
    else:
        safe_set_full_fp32_param(param, value)


def _unfused_master(optimizer: Any, param: torch.Tensor) -> torch.Tensor | None:
    """The live fp32 master of `param` in DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 bf16), else None."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return None
    for masters, params in zip(optimizer.fp32_groups, optimizer.fp16_groups, strict=True):
        for master, p in zip(masters, params, strict=True):
            if p is param:
                return master
    return None


def _undo_state_init_step(optimizer: Any) -> None:
    """Undo FP16_UnfusedOptimizer's zero-gradient step at construction (module docstring): the masters
    become their parameters' values again (they were cloned from them and the module was not touched
    since) and the torch optimizer's state is emptied (all four optimizers create it lazily)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return
    with torch.no_grad():
        for masters, params in zip(optimizer.fp32_groups, optimizer.fp16_groups, strict=True):
            for master, p in zip(masters, params, strict=True):
                master.copy_(p)
    optimizer.optimizer.state.clear()


def _skip_inference_comm_op() -> None:
    """Mark DeepSpeed's shared-memory all-reduce op unavailable (module docstring): its backend then
    neither builds nor loads it. DeepSpeed keeps the probed op table in one module-level dict, which it
    documents as editable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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


@dataclass(frozen=True)
class StepOutcome:
    """What `optimizer_step` did: whether the update was applied, and the global pre-clip grad norm."""

    applied: bool
    grad_norm: float | None  # None where DeepSpeed computed none; inf/NaN when the step was skipped


def optimizer_step(engine: Any) -> StepOutcome:
    """`engine.step()` after the accumulation boundary, unless the global gradient norm is NaN/inf.

    Collective; every rank reaches the same decision. DeepSpeed's own optimizer wrappers (ZeRO-1/2/3,
    and the bf16 optimizer at ZeRO-0) already compute the global norm inside `step()` and, when it is
    invalid, skip the update and clear their partitioned gradient buffers themselves (their fp16
    overflow path, taken for any dtype in 0.19.8); `engine.was_step_applied()` reports it. A torch
    optimizer at ZeRO-0 fp32 is stepped unchecked, so there the norm is checked here, before
    `step()`, and the gradients are dropped as DeepSpeed would drop them.
    """
    if not hasattr(engine.optimizer, "overflow"):  # the attribute DeepSpeed itself reads for skipping
        # Gradients were already averaged over ranks in the boundary backward, so every rank sees the
        # same norm; the all-reduce makes the decision common regardless.
        norm = _grad_norm(engine.module)
        if not _finite_on_every_rank(norm, engine.device):
            _skip_zero0_step(engine)
            return StepOutcome(applied=False, grad_norm=norm)
        engine.step()
        return StepOutcome(applied=True, grad_norm=norm)
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    applied = bool(engine.was_step_applied())
    if applied and norm is not None and not math.isfinite(norm):
        raise RuntimeError(f"DeepSpeed applied an optimizer step with gradient norm {norm}; this "
                           "DeepSpeed version does not skip non-finite steps (0.19.8 does)")
    return StepOutcome(applied=applied, grad_norm=norm)


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


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0


def _finite_on_every_rank(value: float, device: torch.device) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return math.isfinite(value)
    flag = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return not flag.item()


def _skip_zero0_step(engine: Any) -> None:
    """Drop this step's gradients (at ZeRO-0 they live only in `param.grad`) and count the step as
    `DeepSpeedEngine._take_model_step` counts one its own optimizers skipped, so the engine's counters
    (saved in checkpoints) read the same at every stage. The torch optimizer is not touched."""
    engine.zero_grad()
    engine.skipped_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.micro_steps += 1


def _on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"
