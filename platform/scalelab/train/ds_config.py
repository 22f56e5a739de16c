"""The DeepSpeed config of a gradient-cache run, and the batch geometry it is derived from.

Geometry (one step, `world` data-parallel ranks):
- per-rank batch = global_batch / world (must divide: every rank holds the same number of rows, as
  the all-gather of embeddings in the distributed loss requires);
- image micro-batches per rank = ceil(per_rank / micro_batch_size), text micro-batches
  = ceil(per_rank / text_micro_batch_size) (default: the image size); the last one may be short;
- backward calls per rank = max of the two: the cached step backpropagates image micro-batch k and
  text micro-batch k in one call (`scalelab.gradcache.cached_step`).

DeepSpeed must see one accumulation micro-step per backward call: `gradient_accumulation_steps` =
backward calls. The engine is driven with `engine.backward(loss, scale_wrt_gas=False)` (the cached
surrogate already carries the full-batch gradient; dividing by GAS would shrink it) and
`set_gradient_accumulation_boundary(k == calls - 1)`. With `gradient_accumulation_steps=1` and
several backward calls before one `step()`, ZeRO-1/2 produce silently wrong gradients (measured on
DeepSpeed 0.19.8, CPU, 2 gloo ranks; tests/train/test_engine.py checks the pattern used here against a
single-process reference on stages 0-3).

DeepSpeed insists on train_batch_size == micro × GAS × world. Micro-batches here have uneven sizes,
so `train_micro_batch_size_per_gpu` is nominal: ceil(per_rank / GAS), the mean rows per backward
call rounded up. train_batch_size then equals global_batch whenever GAS divides the per-rank batch,
and overstates it by < world × GAS rows otherwise. DeepSpeed uses these two numbers only for its own
data loader (not used) and throughput printouts; gradients never depend on them.

Which optimizers a config can wrap: ZeRO-1/2/3 step the wrapped optimizer on flat 1-D fp32 partitions
instead of the parameters (ZeRO-0 steps the parameters, or in bf16 fp32 master copies of the same
shapes). An elementwise optimizer (AdamW, Lion) computes the same update on them; big_vision's Adafactor
(`adafactor_bv`) would silently become an unfactored one, so such configs are refused
(`refuse_flattening_optimizer`, train/optim.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scalelab.config import ConfigError, OptimConfig, TrainConfig

__all__ = ["SHAPE_DEPENDENT_OPTIMIZERS", "BatchGeometry", "batch_geometry", "deepspeed_config",
           "refuse_flattening_optimizer"]

STEPS_PER_PRINT = 1 << 30  # DeepSpeed's own progress lines; we log through MLflow instead

# Optimizers whose update of a parameter depends on its shape (a factored second moment), refused where
# DeepSpeed flattens. torch's `adafactor` is shape-dependent too but accepted there with a documented
# caveat (train/optim.py): the BASIC presets run it under bf16 ZeRO-2/3, where nothing else fits.
SHAPE_DEPENDENT_OPTIMIZERS = frozenset({"adafactor_bv"})


@dataclass(frozen=True)
class BatchGeometry:
    """How one global batch is split: across ranks, then into gradient-cache micro-batches."""

    world_size: int
    per_rank_batch: int
    image_micro_batches: int
    text_micro_batches: int

    @property
    def backward_calls(self) -> int:
        """Backward calls per rank per step = DeepSpeed's gradient_accumulation_steps."""
        return max(self.image_micro_batches, self.text_micro_batches)

    def calls_for(self, image_locked: bool) -> int:
        """Backward calls of one step: a locked image tower is not replayed, so only the text
        micro-batches call backward. DeepSpeed keeps `backward_calls` as its accumulation steps either
        way (one config for a run whose tower unlocks midway): the boundary is set explicitly on the
        last call, and with fewer calls than accumulation steps every ZeRO stage still accumulates and
        reduces exactly (tests/train/test_image_tower.py)."""
        return self.text_micro_batches if image_locked else self.backward_calls


def batch_geometry(train: TrainConfig, world_size: int) -> BatchGeometry:
    """Split `train.global_batch` over `world_size` ranks and into micro-batches (module docstring)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be a positive integer, got {world_size!r}")
    if train.global_batch % world_size:
        raise ConfigError(
            f"train.global_batch={train.global_batch} must be divisible by the world size {world_size} "
            "(every rank encodes the same number of rows)"
        )
    per_rank = train.global_batch // world_size
    text_micro = train.text_micro_batch_size or train.micro_batch_size
    return BatchGeometry(
        world_size=world_size,
        per_rank_batch=per_rank,
        image_micro_batches=math.ceil(per_rank / train.micro_batch_size),
        text_micro_batches=math.ceil(per_rank / text_micro),
    )


def deepspeed_config(
    train: TrainConfig, optim: OptimConfig, *, micro_batches: int, world_size: int
) -> dict[str, Any]:
    """The config dict for `deepspeed.initialize(model=..., optimizer=<torch optimizer>, config=...)`.

    `micro_batches` is the number of backward calls per rank per step; it must equal
    `batch_geometry(train, world_size).backward_calls` (a mismatch would put the accumulation boundary
    in the wrong place), and is taken as an argument so the caller states what its loop will do.
    No "optimizer"/"scheduler" sections: the torch optimizer is passed in (a config optimizer triggers
    DeepSpeed's JIT op builds) and the lr is set each step by `schedule.apply_lr`.
    """
    geometry = batch_geometry(train, world_size)
    if micro_batches != geometry.backward_calls:
        raise ConfigError(
            f"micro_batches={micro_batches} does not match the batch geometry: per-rank batch "
            f"{geometry.per_rank_batch} (train.global_batch={train.global_batch} / world {world_size}) "
            f"gives {geometry.image_micro_batches} image micro-batches of <= {train.micro_batch_size} and "
            f"{geometry.text_micro_batches} text micro-batches, i.e. {geometry.backward_calls} backward calls"
        )
    refuse_flattening_optimizer(train, optim)
    micro = math.ceil(geometry.per_rank_batch / micro_batches)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": micro * micro_batches * world_size,
        "zero_optimization": {"stage": int(train.zero_stage)},
        "bf16": {"enabled": train.precision == "bf16"},
        # fp16 is not offered: DeepSpeed refuses it on CPU, and its loss scaling would have to be
        # threaded through the cached surrogate.
        "fp16": {"enabled": False},
        # DeepSpeed 0.19.8 defaults this to 1.0: say 0.0 explicitly when clipping is off.
        "gradient_clipping": float(optim.grad_clip) if optim.grad_clip is not None else 0.0,
        # Adafactor (and any non-Adam torch optimizer) is refused under ZeRO without this.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }


def refuse_flattening_optimizer(train: TrainConfig, optim: OptimConfig) -> None:
    """ConfigError when DeepSpeed would hand a shape-dependent optimizer flat partitions (module docstring).

    Where it happens, in DeepSpeed 0.19.8's `DeepSpeedEngine._configure_optimizer`: ZeRO 1-3 (fp32 or
    bf16) wrap the optimizer in a ZeRO or BF16 optimizer over flat partitions. ZeRO-0 fp32 steps the
    parameters themselves, and ZeRO-0 bf16 wraps any optimizer but DeepSpeed's FusedAdam in
    `FP16_UnfusedOptimizer`, over one fp32 master copy *per parameter*, of its shape
    (tests/train/test_optim.py checks both).
    """
    if optim.name in SHAPE_DEPENDENT_OPTIMIZERS and train.zero_stage > 0:
        raise ConfigError(
            f"optim.name={optim.name} cannot run with train.zero_stage={train.zero_stage}: "
            f"ZeRO-{train.zero_stage} steps the optimizer on flat 1-D partitions of each parameter group, "
            "not on the parameters, so it would silently lose its factored (per-row / per-column) second "
            "moment of weight matrices and become a different, unfactored optimizer. Use "
            "train.zero_stage=0 (fp32 or bf16), or optim.name=lion or adamw (elementwise: exact under "
            "every stage)"
        )
