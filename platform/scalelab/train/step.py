"""One optimizer step of the gradient-cache contrastive loss through a DeepSpeed engine.

`train_step` = set the scheduled lr → `gradcache.cached_step` with the engine's backward → one
`engine.step()` → clamp the temperature. The pieces that make this exact (tested against a plain
single-process full-batch step in `tests/train/test_engine.py`):

- The cached step calls `backward(surrogate)` once per micro-batch pair. Each call goes through
  `engine.backward(loss, scale_wrt_gas=False)`: the surrogate's gradient already *is* the share of the
  full-batch gradient, so DeepSpeed must not divide it by `gradient_accumulation_steps`.
- Before each call, `engine.begin_micro_step` does what `engine.forward` would (the encoders are run
  directly, not through the engine): without it ZeRO-3 overwrites instead of accumulating gradients.
- The accumulation boundary is set explicitly, False on every call but the last. ZeRO-1/2 reduce and
  partition gradients at the boundary (with a wrong boundary they silently drop or double micro-batch
  gradients); `gradient_accumulation_steps` in the DeepSpeed config equals the call count.
- Data parallelism *averages* gradients over ranks; `cached_step(distributed=True)` scales each
  rank's own-row embedding gradients by the world size to compensate, so the average is exactly the
  gradient of the global-batch loss (the temperature term is identical on every rank).
- Clamp (CLIP: logit_scale ≤ ln 100 after each step) must reach the optimizer's fp32 master copy as
  well as the working parameter: ZeRO-1/2/3 and the bf16 optimizer keep a separate fp32 partition
  and overwrite the model parameter from it at the next step, so clamping only `engine.module` would
  be undone. Under ZeRO-3 the working parameter is partitioned (an empty tensor outside a forward),
  so it is clamped inside `deepspeed.zero.GatheredParameters(..., modifier_rank=0)`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from scalelab.config import MAX_LOGIT_SCALE, ExperimentConfig
from scalelab.gradcache import cached_step
from scalelab.train.ds_config import batch_geometry
from scalelab.train.engine import begin_micro_step, zero_stage
from scalelab.train.schedule import apply_lr, lr_for

__all__ = ["clamp_temperature", "train_step"]


def train_step(
    engine: Any, images: Tensor, tokens: Tensor, cfg: ExperimentConfig, *, step: int
) -> dict[str, float | None]:
    """One optimizer step on this rank's rows of the global batch; returns metrics under stable keys.

    `images`/`tokens` are this rank's `global_batch / world_size` rows; `step` is the number of
    optimizer steps already taken (it selects the lr). Keys: `train/loss` (global-batch loss, the same
    on every rank), `train/lr`, `train/logit_scale` (the value the loss used, i.e. before this step's
    update), `train/grad_norm` (global, before clipping), `train/image_accuracy`,
    `train/text_accuracy`, `train/replay_max_abs_diff`, and `train/time/<phase>_s` for
    cache_forward, loss, replay_backward, optimizer and total.
    """
    t_start = time.perf_counter()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    geometry = batch_geometry(cfg.train, world)
    if images.shape[0] != geometry.per_rank_batch:
        raise ValueError(
            f"this rank got {images.shape[0]} samples, expected train.global_batch / world = "
            f"{cfg.train.global_batch} / {world} = {geometry.per_rank_batch}"
        )
    lr = lr_for(step, cfg.optim, cfg.train.steps)
    apply_lr(engine.optimizer, lr)

    calls = geometry.backward_calls
    done = 0

    def backward(surrogate: Tensor) -> None:
        nonlocal done
        if done >= calls:
            raise RuntimeError(f"cached_step made more than the {calls} backward calls the geometry gives")
        begin_micro_step(engine)  # what engine.forward would do: ZeRO-3 accumulates, not overwrites
        engine.set_gradient_accumulation_boundary(done == calls - 1)
        engine.backward(surrogate, scale_wrt_gas=False)
        done += 1

    result = cached_step(
        engine.module,
        images,
        tokens,
        micro_batch_size=cfg.train.micro_batch_size,
        text_micro_batch_size=cfg.train.text_micro_batch_size,
        loss=cfg.loss.kind,
        block_size=cfg.loss.block_size,
        backward=backward,
        distributed=world > 1,
    )
    if done != calls:  # the boundary would never have been reached: refuse rather than skip the step
        raise RuntimeError(f"cached_step made {done} backward calls; the DeepSpeed config expects {calls}")

    t0 = time.perf_counter()
    # ZeRO-0 with a torch optimizer keeps no norm; its gradients are already averaged (the reduction
    # runs in the boundary backward), so take the norm here, before step() clips and clears them.
    own_norm = _grad_norm(engine.module) if zero_stage(engine) == 0 else None
    engine.step()
    clamp_temperature(engine)
    t_opt = time.perf_counter() - t0
    norm = engine.get_global_grad_norm()
    norm = own_norm if norm is None else float(norm)

    metrics = {
        "train/loss": result.loss,
        "train/lr": lr,
        "train/logit_scale": result.logit_scale,
        "train/grad_norm": norm,  # before clipping; None where DeepSpeed computed none
        "train/image_accuracy": result.image_accuracy,
        "train/text_accuracy": result.text_accuracy,
        "train/replay_max_abs_diff": result.replay_max_abs_diff,
    }
    metrics.update({f"train/time/{name}": value for name, value in result.timings.items()})
    metrics["train/time/optimizer_s"] = t_opt
    metrics["train/time/total_s"] = time.perf_counter() - t_start
    return metrics


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0


def clamp_temperature(engine: Any) -> None:
    """Clamp logit_scale to ≤ ln 100 in the optimizer's fp32 master copy and in the model (module doc).

    Collective under ZeRO (every rank must call it): reading the full fp32 master value all-reduces
    (ZeRO-1/2, bf16), and gathering the partitioned parameter all-gathers (ZeRO-3).
    """
    import deepspeed
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    model = engine.module
    param = model.temperature.logit_scale
    if zero_stage(engine) == 3:
        # Each rank clamps its own fp32 partition (padding included: harmless). Not the "full" API:
        # in 0.19.8 `safe_set_full_fp32_param` narrows past the end of a padded partition, which a
        # one-element parameter split over two ranks always is.
        local = safe_get_local_fp32_param(param)
        if local is not None:
            safe_set_local_fp32_param(param, local.clamp(max=MAX_LOGIT_SCALE))
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            model.clamp_()  # rank 0's value is scattered back on exit; every rank computes the same
        return
    master = safe_get_full_fp32_param(param)  # None when the optimizer steps the parameter itself
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(max=MAX_LOGIT_SCALE))
    model.clamp_()
