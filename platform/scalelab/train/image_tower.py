"""`model.image`: the image tower's pretrained start, LiT lock, unlock step and learning-rate multiplier.

Start (`init`): a weights file is read by `models.read_weights_file` (timm's helper); a directory is a
`scalelab export` (its model.pt), a checkpoint folder, or a run directory (its newest complete
checkpoint), read through `export.read_checkpoint_weights` — the same fp32 weights an export would
write, whatever the ZeRO stage, and whatever task wrote the run, as long as its tower's keys are
`image_tower.*`. Every rank loads them before the engine is built, so all ranks start equal (and ZeRO-3
partitions the loaded values). Preflight reads them once more to refuse a bad path, format, or key set.

Lock (LiT): the tower is in eval mode and the cached step encodes it once, with no replay and no
backward (`gradcache`, `lock_image`). Two ways to hold its parameters, by what comes next:
- Locked for the whole run: requires_grad False. The tower is in no optimizer group — no optimizer
  memory, nothing any ZeRO stage could touch — so its parameters stay bit-identical.
- Unlocked at step k: DeepSpeed ZeRO flattens the optimizer's groups into partitions at
  `deepspeed.initialize` (and leaves requires_grad=False parameters out), so a parameter cannot join
  the optimizer later. The tower therefore sits in the optimizer from the start, in groups of its own
  (`IMAGE_GROUPS`, carrying `lr_mult`), which are paused while locked: lr 0 (decoupled weight decay
  multiplies by exactly 1) and no gradient (ZeRO-1/2/3 step their flat partitions with zeros, ZeRO-0's
  torch optimizer skips None gradients). Parameters stay bit-identical. The moments of a zero gradient
  stay 0, but Adam's step count would tick on ZeRO-1/2/3 (not on ZeRO-0), so the first updates after
  unlocking would miss their bias correction (with β₂ = 0.98: up to 1.5× a fresh Adam's step for ~50
  steps) and differ between stages. `fresh_while_paused` therefore zeroes a paused group's optimizer
  state after each step: at step k every stage holds exactly a fresh optimizer's state, i.e. unlocking
  at k is the tower joining the optimizer at k (the reference tests/train/test_image_tower.py checks).
  The alternative, rebuilding the engine at step k, would have to carry the text tower's Adam state
  across a change of ZeRO partitions.
Everything here is a function of the step (mode, lr, pause) or is checkpointed (optimizer state), so a
run resumed on either side of the unlock continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scalelab.config import ConfigError, ExperimentConfig, ImageTrainConfig
from scalelab.models import DualEncoder, load_image_weights, match_image_weights, read_weights_file
from scalelab.train.checkpoint import META_NAME, latest_checkpoint
from scalelab.train.export import MODEL_NAME, is_exported, read_checkpoint_weights
from scalelab.train.schedule import image_locked_at

__all__ = ["IMAGE_GROUPS", "ImagePhase", "check_image_init", "enter_image_phase", "fresh_while_paused",
           "prepare_model", "read_image_init"]

# The image tower's optimizer groups when it has its own (optim.param_groups: "<module>.<kind>").
IMAGE_GROUPS = ("image_tower.decay", "image_tower.no_decay")
_FIELD = "model.image.init"


def read_image_init(init: str) -> dict[str, torch.Tensor]:
    """The state dict `init` names (module docstring); ConfigError naming the field and the path."""
    path = Path(init)
    try:
        if path.is_file():
            return read_weights_file(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no such file or directory: {path}")
        if is_exported(path):
            return read_weights_file(path / MODEL_NAME)
        checkpoint = path if (path / META_NAME).is_file() else latest_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"{path} is neither a `scalelab export` directory nor a checkpoint "
                                    "folder nor a run directory with a complete checkpoint")
        return read_checkpoint_weights(checkpoint).state
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{_FIELD}: {err}") from None


def prepare_model(model: DualEncoder, cfg: ExperimentConfig, *, load_weights: bool = True) -> DualEncoder:
    """`model` as training starts it under `cfg.model.image`: init weights loaded (unless
    `load_weights` is False: export and preflight only need the layout), locked, frozen for good or
    given its own optimizer groups. Call before the engine (and its optimizer) is built."""
    image = cfg.model.image
    if load_weights and image.init is not None:
        try:
            load_image_weights(model.image_tower, read_image_init(image.init))
        except ValueError as err:
            raise ConfigError(f"{_FIELD}: {err}") from None
    if image.lock:
        model.lock_image_tower(True)
        if image.unlock_at_step is None:
            model.image_tower.requires_grad_(False)
    if image.unlock_at_step is not None or image.lr_mult != 1.0:
        model.image_tower.lr_mult = image.lr_mult  # groups of its own (optim.param_groups)
    return model


def check_image_init(cfg: ExperimentConfig, model: DualEncoder) -> None:
    """Preflight: `init` exists, reads, and fits `model`'s image tower (a meta-device model will do)."""
    if cfg.model.image.init is None:
        return
    state = read_image_init(cfg.model.image.init)
    try:
        match_image_weights(model.image_tower, state)
    except ValueError as err:
        raise ConfigError(f"{_FIELD}: {err}") from None


@dataclass(frozen=True)
class ImagePhase:
    """The image tower at one step: locked (no replay, no gradient) and which groups are paused."""

    locked: bool
    paused: tuple[str, ...]


def enter_image_phase(model: DualEncoder, image: ImageTrainConfig, step: int) -> ImagePhase:
    """Put the tower in its mode for optimizer step `step` (eval while locked) and say what holds."""
    locked = image_locked_at(step, image)
    if image.lock:
        model.lock_image_tower(locked)
    # Only a tower that unlocks later has groups to pause; one locked for good has none.
    paused = IMAGE_GROUPS if locked and image.unlock_at_step is not None else ()
    return ImagePhase(locked, paused)


@contextlib.contextmanager
def fresh_while_paused(engine: Any, paused: Collection[str]) -> Iterator[None]:
    """Zero the optimizer state of the `paused` groups after each optimizer step taken inside.

    A hook on the torch optimizer itself, not on DeepSpeed's wrapper: ZeRO-1/2/3 hand it one group (or
    sub-group) at a time as a flat fp32 partition, and ZeRO-3 empties a group's parameter list again
    after its step, so the partitions are reachable only while the torch optimizer steps. Zeroing in
    place (rather than dropping the entries) keeps DeepSpeed's links to the state tensors valid. All-zero
    state is what AdamW, Adafactor and Lion start from.
    """
    if not paused:
        yield
        return
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch one under a wrapper

    def zero_paused_state(opt: torch.optim.Optimizer, *_: Any) -> None:
        for group in opt.param_groups:
            if group.get("name") in paused:
                for param in group["params"]:
                    _zero_state(opt.state.get(param, {}))

    handle = optimizer.register_step_post_hook(zero_paused_state)
    try:
        yield
    finally:
        handle.remove()


def _zero_state(state: dict[str, Any]) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value.zero_()
        elif isinstance(value, int | float):
            state[key] = type(value)(0)
