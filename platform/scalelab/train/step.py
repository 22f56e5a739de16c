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
  well as the working parameter: ZeRO-1/2/3 and the bf16 optimizers (ZeRO-0 bf16 included) keep a
  separate fp32 master and overwrite the model parameter from it at the next step, so clamping only
  `engine.module` would be undone. Under ZeRO-3 the working parameter is partitioned (an empty tensor
  outside a forward), so it is clamped inside `deepspeed.zero.GatheredParameters(..., modifier_rank=0)`.

Non-finite steps (NaN/inf loss or gradient norm) are skipped on every rank, with no parameter or
optimizer-state update, and reported as `train/skipped` = 1.0:
- `cached_step(on_nonfinite="skip")` judges the embeddings and the loss on the *gathered* global batch
  and agrees by an all-reduce, so a NaN in one rank's rows makes every rank skip before any backward
  call: the engine never sees the step (no gradient, no micro-step, no boundary).
- A finite loss can still give a NaN/inf gradient: `engine.optimizer_step` then skips the update and
  discards the step's gradients (DeepSpeed's ZeRO-1/2/3 optimizers do it themselves; ZeRO-0 is checked
  there), so the next step is exactly what it would have been without the bad batch.
`NonFiniteGuard` is the run's policy over those per-step flags: count them (`train/skipped_steps`) and
stop with `NonFiniteRunError` after `train.max_skipped_steps` consecutive ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from scalelab.config import MAX_LOGIT_SCALE, ExperimentConfig
from scalelab.gradcache import CachedStepResult, cached_step
from scalelab.train.ds_config import batch_geometry
from scalelab.train.engine import (
    StepOutcome,
    begin_micro_step,
    fp32_master,
    optimizer_step,
    set_fp32_master,
    zero_stage,
)
from scalelab.train.image_tower import enter_image_phase, fresh_while_paused
from scalelab.train.schedule import apply_lr, lr_for

__all__ = ["NonFiniteGuard", "NonFiniteRunError", "clamp_temperature", "train_step"]


def train_step(
    engine: Any, images: Tensor, tokens: Tensor, cfg: ExperimentConfig, *, step: int
) -> dict[str, float | None]:
    """One optimizer step on this rank's rows of the global batch; returns metrics under stable keys.

    `images`/`tokens` are this rank's `global_batch / world_size` rows; `step` is the number of
    optimizer steps already taken (it selects the lr). Keys: `train/loss` (global-batch loss, the same
    on every rank; NaN/inf as computed on a skipped step), `train/lr`, `train/logit_scale` (the value
    the loss used, i.e. before this step's update), `train/grad_norm` (global, before clipping; None
    when not computed), `train/skipped` (1.0 when the step was skipped as non-finite, else 0.0: no
    update on any rank), `train/image_accuracy`, `train/text_accuracy`, `train/replay_max_abs_diff`,
    and `train/time/<phase>_s` for cache_forward, loss, replay_backward, optimizer and total; with
    `model.image.lock`, `train/image_locked` (1.0 while the image tower is locked: train/image_tower.py).
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
    image = enter_image_phase(engine.module, cfg.model.image, step)  # locked (LiT) or training
    apply_lr(engine.optimizer, lr, paused=image.paused)
    # Under bf16 DeepSpeed keeps the module in bf16 and casts inputs in `engine.forward`, which the
    # gradient cache bypasses (it calls the module itself): cast the images here (tokens are ids).
    images = images.to(_compute_dtype(engine.module))

    backward = _EngineBackward(engine, geometry.calls_for(image.locked))
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
        on_nonfinite="skip",
        lock_image=image.locked,
    )
    t0 = time.perf_counter()
    outcome = StepOutcome(applied=False, grad_norm=None)
    if not result.skipped:  # a skipped cached step made no backward call: nothing to step or clear
        backward.check_complete()
        with fresh_while_paused(engine, image.paused):  # a paused tower's optimizer state stays fresh
            outcome = optimizer_step(engine)
        if outcome.applied:  # after a skipped update the temperature is as clamped as before
            clamp_temperature(engine)
    t_opt = time.perf_counter() - t0

    metrics = _metrics(result, outcome, lr)
    if cfg.model.image.lock:
        metrics["train/image_locked"] = 1.0 if image.locked else 0.0
    metrics["train/time/optimizer_s"] = t_opt
    metrics["train/time/total_s"] = time.perf_counter() - t_start
    return metrics


def _compute_dtype(module: Any) -> torch.dtype:
    """The floating dtype the module computes in (its first floating parameter's; fp32 if none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class _EngineBackward:
    """The `backward(surrogate)` cached_step calls, driven through the engine (module docstring)."""

    def __init__(self, engine: Any, calls: int) -> None:
        self.engine, self.calls, self.done = engine, calls, 0

    def __call__(self, surrogate: Tensor) -> None:
        if self.done >= self.calls:
            raise RuntimeError(
                f"cached_step made more than the {self.calls} backward calls the geometry gives"
            )
        begin_micro_step(self.engine)  # what engine.forward would do: ZeRO-3 accumulates, not overwrites
        self.engine.set_gradient_accumulation_boundary(self.done == self.calls - 1)
        self.engine.backward(surrogate, scale_wrt_gas=False)
        self.done += 1

    def check_complete(self) -> None:
        if self.done != self.calls:  # the boundary was never reached: refuse rather than skip the step
            raise RuntimeError(
                f"cached_step made {self.done} backward calls; the DeepSpeed config expects {self.calls}"
            )


def _metrics(result: CachedStepResult, outcome: StepOutcome, lr: float) -> dict[str, float | None]:
    skipped = result.skipped or not outcome.applied
    metrics = {
        "train/loss": result.loss,
        "train/lr": lr,
        "train/logit_scale": result.logit_scale,
        "train/grad_norm": outcome.grad_norm,
        "train/skipped": 1.0 if skipped else 0.0,
        "train/image_accuracy": result.image_accuracy,
        "train/text_accuracy": result.text_accuracy,
        # no replay ran on a step skipped before backward
        "train/replay_max_abs_diff": None if result.skipped else result.replay_max_abs_diff,
    }
    metrics.update({f"train/time/{name}": value for name, value in result.timings.items()})
    return metrics


class NonFiniteRunError(RuntimeError):
    """Too many consecutive training steps were non-finite (NaN/inf) and skipped: the run stops."""


class NonFiniteGuard:
    """The run's policy for non-finite steps: count every skipped step, stop after too many in a row.

    `max_consecutive` (`train.max_skipped_steps`) consecutive skipped steps are tolerated; the next one
    raises `NonFiniteRunError` (0: the first one raises). A step that trains resets the run. Every rank
    keeps one and observes the same flags (the skip is agreed), so every rank raises at the same step.
    `state_dict()` is two ints for a checkpoint; `load_state_dict` restores them on resume.
    """

    def __init__(self, max_consecutive: int) -> None:
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 0:
            raise ValueError(f"max_consecutive must be an integer >= 0, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.total = 0  # skipped steps over the whole run: the metric train/skipped_steps
        self.consecutive = 0  # skipped steps since the last step that trained

    def observe(self, skipped: bool, *, step: int) -> None:
        """Record one step (`step`: its number as logged, e.g. the MLflow step of its metrics)."""
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise NonFiniteRunError(
                f"{self.consecutive} consecutive training step(s), ending at step {step}, had a NaN/inf "
                f"loss or gradient norm and were skipped ({self.total} skipped in this run); "
                f"train.max_skipped_steps={self.max_consecutive} allows at most {self.max_consecutive} "
                "in a row. Raise train.max_skipped_steps (the same command then resumes), check the data "
                "for corrupt samples (scalelab data validate), or train with a lower optim.lr or a longer "
                "optim.warmup_steps under a new run name."
            )

    def metrics(self) -> dict[str, int]:
        return {"train/skipped_steps": self.total}

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


def clamp_temperature(engine: Any) -> None:
    """Clamp logit_scale to ≤ ln 100 in the optimizer's fp32 master copy and in the model (module doc).

    Collective under ZeRO (every rank must call it): reading the full fp32 master value all-reduces
    (ZeRO-1/2, the BF16 optimizer), and gathering the partitioned parameter all-gathers (ZeRO-3).
    """
    import deepspeed
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

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
    # At ZeRO-1/2 DeepSpeed's accessor reads the master; at ZeRO-0 bf16 it cannot (FP16_UnfusedOptimizer's
    # per-parameter masters are invisible to it), and a master left unclamped is copied back into the
    # module at the next step, so `fp32_master` reads that wrapper directly (train/engine.py).
    master = fp32_master(engine, param)  # None when the optimizer steps the parameter itself (ZeRO-0 fp32)
    if master is not None:
        set_fp32_master(engine, param, master.clamp(max=MAX_LOGIT_SCALE))
    model.clamp_()
