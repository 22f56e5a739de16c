"""Optimizer construction: weight-decay parameter groups and the AdamW / Adafactor factory.

Weight decay applies to weight matrices and conv kernels only. Exempt, as in CLIP/open_clip and
timm: biases, normalisation parameters (LayerNorm / BatchNorm / GroupNorm / RMSNorm ...), learned
position tables (and the class/register tokens timm lists next to them), and the temperature
(`logit_scale`, `logit_bias`). Decaying those pulls them towards 0: a norm gain towards 0 shrinks its
layer's output, and a decayed `logit_scale` drifts the temperature towards 1 — both fight the loss
rather than regularise capacity. The token embedding table is a weight matrix and *is* decayed
(open_clip decays it as well; unlike open_clip we exempt the 2-D position tables, following timm).

Weight-decay semantics of both optimizers, as torch implements them (checked in torch 2.14):
- `torch.optim.AdamW`: θ ← θ − lr_t · wd · θ, then the Adam update. "Decoupled" from the gradient
  (Loshchilov & Hutter) but multiplied by the *current* lr, so the decay follows the schedule.
- `torch.optim.Adafactor(lr, beta2_decay, eps, d, weight_decay)`: the same θ ← θ − lr_t · wd · θ.
  Its lr is not an absolute step: the update is RMS(θ) · min(lr_t, 1/√t) · Û (relative step size,
  Shazeer & Stern), so lr caps the relative step. It keeps no first moment, so `betas` and `eps` of
  OptimConfig (Adam's) do not apply and torch's defaults are used (β₂ schedule 1 − t^−0.8, eps
  (None, 1e-3), update clipping d = 1).
- BASIC / big_vision's "decoupled weight decay" is θ ← θ − wd · s_t · θ with s_t the schedule
  *multiplier* in [0, 1], not lr_t = peak · s_t. A BASIC value `wd_basic` therefore corresponds to
  `weight_decay = wd_basic / peak_lr` here.

Adafactor under DeepSpeed: ZeRO-1/2 and the bf16 optimizer (any stage) hand the wrapped optimizer
one flat 1-D fp32 partition per group and rank (ZeRO-3: flat sub-groups), not the parameters. AdamW
is elementwise and does not notice; Adafactor does: its second moment is no longer factored (no
memory saving), and RMS(θ) and the update clipping are taken over a whole partition, whose content
depends on the world size. Adafactor is per-parameter exact only with ZeRO stage 0 in fp32.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from scalelab.config import OptimConfig

__all__ = ["NORM_TYPES", "build_optimizer", "is_no_decay", "param_groups"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, _BatchNorm, _InstanceNorm,
)  # timm's LayerNorm2d / BatchNormAct2d / GroupNormAct subclass these

TEMPERATURE_NAMES = frozenset({"logit_scale", "logit_bias"})
# Learned position tables and the learned tokens timm keeps beside them, by attribute name, for
# modules that do not advertise them through `no_weight_decay()` (our TextTower's positional_embedding).
POSITION_NAME = re.compile(
    r"^(pos(itional|ition)?_emb(ed|edding|eddings)?|class_embedding|cls_token|reg_token|dist_token)$"
)


def _owned_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(full name, owning module, attribute name, parameter), each parameter once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # a tied parameter: grouped where first met
            seen.add(id(param))
            yield (f"{module_name}.{attr}" if module_name else attr), module, attr, param


def _advertised_no_decay(model: nn.Module) -> set[str]:
    """Full names listed by modules' `no_weight_decay()` (timm's convention: names relative to the
    module, e.g. ViT's {'pos_embed', 'cls_token'}, MaxxViT's relative-position tables)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if module is model or not callable(fn):
            continue
        prefix = f"{module_name}." if module_name else ""
        names.update(prefix + n for n in fn())
    return names


def is_no_decay(name: str, module: nn.Module, attr: str, param: nn.Parameter, advertised: set[str]) -> bool:
    """The exemption rule (module docstring). `name` is the full name, `module` its owner."""
    return (
        param.ndim < 2  # biases, norm gains/shifts, layer-scale gammas, scalar temperature
        or attr == "bias"
        or isinstance(module, NORM_TYPES)
        or attr in TEMPERATURE_NAMES
        or bool(POSITION_NAME.match(attr))
        or name in advertised
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: {"name": "decay", weight_decay} and {"name": "no_decay", 0.0}.

    Every trainable parameter is in exactly one group; frozen ones (requires_grad=False) in none. The
    two groups are returned even when `weight_decay` is 0, so the optimizer-state layout (which a
    checkpoint is keyed by) does not change with the value; an empty group is left out (ZeRO cannot
    flatten an empty group).

    A submodule with an `lr_mult` attribute that is not None (the image tower, for `model.image`) gets
    two groups of its own after those, "<module>.decay" and "<module>.no_decay", carrying "lr_mult"
    (`schedule.apply_lr` multiplies the scheduled lr by it). Without one the layout is the two groups
    above, as in checkpoints written before multipliers existed.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    advertised = _advertised_no_decay(model)
    owners = {f"{n}.": m.lr_mult for n, m in model.named_modules()
              if n and getattr(m, "lr_mult", None) is not None}
    groups = {"": [
        {"name": "decay", "params": [], "weight_decay": float(weight_decay)},
        {"name": "no_decay", "params": [], "weight_decay": 0.0},
    ]}
    for prefix, mult in owners.items():
        groups[prefix] = [{**g, "name": prefix + g["name"], "params": [], "lr_mult": float(mult)}
                          for g in groups[""]]
    for name, module, attr, param in _owned_parameters(model):
        if not param.requires_grad:
            continue
        owner = max((p for p in groups if name.startswith(p)), key=len)  # the innermost owner
        groups[owner][1 if is_no_decay(name, module, attr, param, advertised) else 0]["params"].append(param)
    return [g for pair in groups.values() for g in pair if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW(betas, eps) or Adafactor over `param_groups(model, cfg.weight_decay)`, lr = cfg.lr.

    The lr is the peak; the training loop sets each step's value with `schedule.apply_lr`.
    """
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adafactor":
        # betas / eps are Adam's and have no Adafactor counterpart (module docstring).
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; allowed: adamw, adafactor")
