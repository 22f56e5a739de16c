"""Learning-rate schedule: linear warmup then cosine decay, as a pure function of the step index.

The curve is a function of the optimizer step alone, with no scheduler object holding state. A run
that resumes at step k (restored from `samples_seen` / the checkpoint's step) sets `lr_at(k, ...)`
and continues on exactly the curve it left: no restarted warmup, no jump, nothing extra to save in
the checkpoint. (A `LambdaLR` restored without its state, or re-created on resume, restarts the
curve: the bug this module exists to avoid.)

Definition, with `s` = number of optimizer steps already taken (0 for the first step), W =
warmup_steps, T = total_steps, P = peak_lr, m = min_lr_ratio:

    s <  W :  lr = P · (s + 1) / W                      linear warmup
    s >= W :  lr = m·P + (1 − m)·P · ½ (1 + cos(π · min(s − W, T − W) / (T − W)))

- The warmup line passes through 0 at s = −1, so the first step already gets P/W (a step at lr 0
  would be wasted) and the last warmup step, s = W − 1, reaches P exactly. This is open_clip's
  `cosine_lr` warmup.
- The cosine starts at P at s = W and reaches m·P at s = T. Steps 0 … T−1 are the ones a T-step run
  takes, so the last one is just above m·P; steps past T (a run extended beyond its planned length)
  stay at m·P rather than climbing back up the cosine.
- W = 0 means no warmup: the cosine starts at step 0.
- T ≤ W is refused (ValueError): the cosine would be empty, so the run would end at (or before) the
  peak — almost always a warmup copied from a longer run into a short sweep point. Say what you mean
  with a smaller warmup.

A parameter group may scale the curve (its "lr_mult", the image tower's `model.image.lr_mult`) or be
paused (lr 0: a locked tower that unlocks later, `image_locked_at`); both are functions of the step too.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from torch import Tensor

from scalelab.config import ImageTrainConfig, OptimConfig

__all__ = ["apply_lr", "image_locked_at", "lr_at", "lr_for"]


def _check(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps={total_steps} must be greater than warmup_steps={warmup_steps} "
            "(the cosine phase would be empty); lower optim.warmup_steps or raise train.steps"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based: steps already taken). See the module docstring."""
    _check(step, peak_lr, warmup_steps, total_steps, min_lr_ratio)
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = total_steps - warmup_steps
    progress = min(step - warmup_steps, span) / span
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = min_lr_ratio * peak_lr
    return floor + (peak_lr - floor) * cosine


def lr_for(step: int, optim: OptimConfig, total_steps: int) -> float:
    """`lr_at` with peak, warmup and floor taken from an `OptimConfig` (lr, warmup_steps, min_lr_ratio)."""
    return lr_at(
        step,
        peak_lr=optim.lr,
        warmup_steps=optim.warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=optim.min_lr_ratio,
    )


def image_locked_at(step: int, image: ImageTrainConfig) -> bool:
    """Whether the image tower is locked for optimizer step `step` (0-based: steps already taken):
    `model.image.lock`, until `unlock_at_step` when one is set (that step is the first to train it)."""
    return image.lock and (image.unlock_at_step is None or step < image.unlock_at_step)


def apply_lr(optimizer: Any, lr: float, *, paused: Collection[str] = ()) -> None:
    """Set each parameter group's learning rate to `lr` × its "lr_mult" (1 when it has none), or to 0
    for a group whose "name" is in `paused` (call before each `step()`).

    A paused group's decoupled weight decay (θ ← θ − lr · wd · θ) is then a multiplication by exactly
    1, and with a zero gradient AdamW / Adafactor / Lion move nothing: its parameters stay bit for bit.
    Works on a torch optimizer and on DeepSpeed's wrappers, whose `param_groups` are the wrapped
    optimizer's. A tensor-valued group lr (torch's capturable/compiled optimizers) is filled in
    place so the tensor captured by a compiled step stays the one that is read.
    """
    for group in optimizer.param_groups:
        value = 0.0 if group.get("name") in paused else float(lr) * group.get("lr_mult", 1.0)
        current = group.get("lr")
        if isinstance(current, Tensor):
            current.fill_(value)
        else:
            group["lr"] = value
