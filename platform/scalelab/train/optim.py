"""Optimizer construction: weight-decay parameter groups and the AdamW / Adafactor / Lion factory.

Weight decay applies to weight matrices and conv kernels only. Exempt, as in CLIP/open_clip and
timm: biases, normalisation parameters (LayerNorm / BatchNorm / GroupNorm / RMSNorm ...), learned
position tables (and the class/register tokens timm lists next to them), and the temperature
(`logit_scale`, `logit_bias`). Decaying those pulls them towards 0: a norm gain towards 0 shrinks its
layer's output, and a decayed `logit_scale` drifts the temperature towards 1 — both fight the loss
rather than regularise capacity. The token embedding table is a weight matrix and *is* decayed
(open_clip decays it as well; unlike open_clip we exempt the 2-D position tables, following timm).
Every optimizer below gets the same two groups.

The optimizers (`optim.name`), from maintained implementations, and how OptimConfig maps onto them:
- `adamw`: `torch.optim.AdamW(lr, betas, eps, weight_decay)`.
- `adafactor`: `torch.optim.Adafactor(lr, weight_decay)`. Its lr is not an absolute step: the update is
  RMS(θ) · min(lr_t, 1/√t) · Û (relative step size, Shazeer & Stern), so lr caps the relative step.
  It keeps no first moment, so `betas` and `eps` (Adam's) do not apply and torch's defaults are used
  (β₂ schedule 1 − t^−0.8, eps (None, 1e-3), update clipping d = 1).
- `lion`: `timm.optim.Lion(lr, betas, weight_decay)` (Chen et al. 2023, "Symbolic Discovery of
  Optimization Algorithms"): θ ← θ − lr_t · sign(β₁·m + (1 − β₁)·g), then m ← β₂·m + (1 − β₂)·g.
  The paper's betas are (0.9, 0.99); OptimConfig's default (0.9, 0.98) is Adam's for CLIP, so set
  them. Every coordinate moves by exactly lr_t, a larger step than Adam's: the paper uses an lr 3–10×
  smaller than AdamW's and a weight decay 3–10× larger (the product lr·wd, the effective decay, kept
  similar). Nothing is rescaled here: a config moved from adamw to lion must change lr and
  weight_decay itself. `eps` does not apply (no denominator). timm's extras stay off (caution,
  corrected weight decay). Why timm's and not DeepSpeed's (`deepspeed.ops.lion`): DeepSpeedCPULion
  and FusedLion are compiled ops (a JIT C++/CUDA build on first use, a toolchain on every worker),
  and DeepSpeed gains nothing from them here — the optimizer is handed in as a torch optimizer and ZeRO
  steps it on its flat partitions like any other. timm's is plain torch, runs on CPU and GPU alike,
  and timm is already a dependency (the image towers).
- `adafactor_bv`: `timm.optim.AdafactorBigVision`, big_vision's Adafactor variant (Zhai et al. 2021,
  "Scaling Vision Transformers"; `big_vision.optax.scale_by_adafactor`): the second moment of a
  parameter whose two largest dims are ≥ 32 is factored into statistics along those two (Shazeer &
  Stern), others keep a full one; β₂_t = min(0.999, 1 − t^−0.8); eps 1e-30 added to g²; momentum
  β = `betas[0]`, stored in bf16 (big_vision's memory saving; the update itself is computed in the
  parameter's dtype); no update clipping (big_vision's default clipping_threshold=None); no scaling by
  RMS(θ), so lr is an absolute step as for AdamW. These are big_vision's defaults, passed explicitly
  (timm factors from 16, big_vision from 32). `betas[1]` and `eps` do not apply. Needs timm ≥ 1.0.29:
  earlier releases dropped the row normalisation of factored matrices whose first dim is the larger
  (timm PR #2749; their clipping was also inverted, fixed in 1.0.30 / PR #2790, unused here).

Weight-decay semantics (read in torch 2.14's and timm 1.0.31's source; tested with zero gradients):
all four multiply θ by (1 − lr_t · wd) each step, with the *current* group lr_t, decoupled from the
gradient and its moments (Loshchilov & Hutter), next to an update that does not depend on θ (torch's
Adafactor excepted: its step is scaled by RMS(θ), read before the decay). For timm's two that is their
default (`unscaled_wd=False`, `corrected_weight_decay=False`). BASIC / big_vision's "decoupled weight
decay" is θ ← θ − wd · s_t · θ with s_t the schedule *multiplier* in [0, 1], not lr_t = peak · s_t. A
BASIC value `wd_basic` therefore corresponds to `weight_decay = wd_basic / peak_lr` here (timm's
`unscaled_wd=True` would drop the schedule from the decay altogether, so it is not used).

Under DeepSpeed: ZeRO-1/2 (fp32, or bf16 through DeepSpeed's BF16 optimizer) hand the wrapped
optimizer one flat 1-D fp32 partition per group and rank (ZeRO-3: flat sub-groups), not the
parameters. ZeRO-0 hands it the parameters (fp32) or one fp32 master copy per parameter, of the same
shape (bf16: DeepSpeed's FP16_UnfusedOptimizer, used for any optimizer but its own FusedAdam; checked
in DeepSpeed 0.19.8, and by tests/train/test_optim.py). AdamW and Lion are elementwise and do not
notice (tests/train/test_optim.py runs Lion on stages 0–3 against plain torch). The Adafactors do.
torch's `adafactor` is accepted there with this caveat: its second moment is no longer factored (no
memory saving), and RMS(θ) and the update clipping are taken over a whole partition, whose content
depends on the world size; it is per-parameter exact only with ZeRO stage 0 (the BASIC presets,
experiments/basic-*.yaml, run it under bf16 ZeRO-2/3 knowingly). `adafactor_bv` is refused at ZeRO-1/2/3
(`ds_config.refuse_flattening_optimizer`, run by preflight and by every engine build): it would run as
a different, unfactored optimizer without saying so, and no shipped config needs it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import get_args

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from scalelab.config import OptimConfig

__all__ = ["NORM_TYPES", "OPTIMIZERS", "build_optimizer", "is_no_decay", "param_groups"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, _BatchNorm, _InstanceNorm,
)  # timm's LayerNorm2d / BatchNormAct2d / GroupNormAct subclass these

OPTIMIZERS = get_args(OptimConfig.model_fields["name"].annotation)  # the names optim.name accepts

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
    """`cfg.name`'s optimizer (module docstring) over `param_groups(model, cfg.weight_decay)`, lr = cfg.lr.

    The lr is the peak; the training loop sets each step's value with `schedule.apply_lr`. Bad
    arguments raise ValueError (preflight turns it into a ConfigError).
    """
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adafactor":
        # betas / eps are Adam's and have no Adafactor counterpart (module docstring).
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    if cfg.name == "lion":
        from timm.optim import Lion

        # caution / corrected_weight_decay stay at timm's default (off): plain Lion as published.
        return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "adafactor_bv":
        return _adafactor_bv(groups, cfg)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; allowed: {', '.join(OPTIMIZERS)}")


# The first timm release whose AdafactorBigVision factors a matrix correctly in both orientations.
ADAFACTOR_BV_MIN_TIMM = (1, 0, 29)


def _adafactor_bv(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    import timm
    from timm.optim import AdafactorBigVision

    version = tuple(int(x) for x in re.findall(r"\d+", timm.__version__)[:3])
    if version < ADAFACTOR_BV_MIN_TIMM:
        raise ValueError(
            f"adafactor_bv needs timm >= {'.'.join(map(str, ADAFACTOR_BV_MIN_TIMM))}, found "
            f"{timm.__version__}: older AdafactorBigVision skips the row normalisation of tall factored "
            "matrices (timm PR #2749)"
        )
    momentum = cfg.betas[0]
    if not 0.0 <= momentum < 1.0:  # timm does not check it; a momentum >= 1 would never forget
        raise ValueError(f"Invalid beta parameter at index 0 (adafactor_bv's momentum): {momentum}")
    # big_vision.optax.scale_by_adafactor's defaults, spelled out: timm's differ in
    # min_dim_size_to_factor (16), and naming them keeps the variant fixed if timm's defaults move.
    return AdafactorBigVision(
        groups, lr=cfg.lr, min_dim_size_to_factor=32, decay_rate=0.8, decay_offset=0, beta2_cap=0.999,
        momentum=momentum, momentum_dtype=torch.bfloat16, eps=1e-30, clipping_threshold=None,
    )
