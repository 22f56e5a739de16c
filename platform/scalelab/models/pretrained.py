"""Pretrained image-tower weights: read a timm-compatible file, match its keys to an ImageTower, load.

Files are read with timm's own helper (`timm.models.load_state_dict`): safetensors or a torch file
(`weights_only`, never an arbitrary pickle), a `state_dict` / `model` wrapper or EMA weights
(`state_dict_ema` preferred, timm's convention) unwrapped, DDP / torch.compile prefixes (`module.`,
`_orig_mod.`) stripped. Nothing is ever downloaded.

Two key layouts are accepted, told apart by the keys (not the file name):
- scalelab's: keys under `image_tower.` — a DualEncoder state dict (`scalelab export`'s model.pt, a
  run's weights; a supervised stage's export holds the same keys). They load into the whole tower,
  projection included; every other key (text tower, temperature, a classifier head) is ignored.
- a bare timm model's state dict (`timm.create_model(name, ...).state_dict()`, e.g. a file fetched
  from the Hub beforehand): the trunk. Its classifier (the keys timm's `pretrained_cfg["classifier"]`
  names, `head` or `head.fc`) is dropped, as timm's own pretrained loading drops it for
  num_classes=0; the projection to the embedding keeps its initialisation.
Anything else is refused: every missing key, unexpected key and shape mismatch is reported (a few
named, plus counts), so a file for another architecture or size fails loudly, never half-loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from scalelab.models.image import ImageTower

__all__ = ["SCALELAB_PREFIX", "WEIGHT_SUFFIXES", "load_image_weights", "match_image_weights",
           "read_weights_file"]

SCALELAB_PREFIX = "image_tower."
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_SHOWN = 3  # keys named per kind of problem; the rest are counted


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (module docstring); FileNotFoundError / ValueError naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    if p.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ValueError(f"{p}: unknown weights format {p.suffix or '(no suffix)'!r}; allowed: "
                         f"{', '.join(WEIGHT_SUFFIXES)} (safetensors, or a torch state dict)")
    try:
        state = timm.models.load_state_dict(str(p), use_ema=True, device="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip readers each raise their own kinds
        raise ValueError(f"{p} could not be read as weights ({type(err).__name__}: {err})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def match_image_weights(tower: ImageTower, state: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """(the module the weights are for: `tower` or `tower.backbone`, the state dict in its own keys).

    ValueError naming the offending keys (as the file spells them) when anything does not fit. Works on
    a meta-device tower: only names and shapes are compared.
    """
    if any(k.startswith(SCALELAB_PREFIX) for k in state):
        target, prefix, what = tower, SCALELAB_PREFIX, "scalelab image-tower weights"
        mapped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        target, prefix, what = tower.backbone, "", "timm trunk weights"
        mapped = _without_classifier(dict(state), tower.backbone)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    mismatched = [f"{prefix}{k} (file {tuple(mapped[k].shape)}, tower {tuple(expected[k].shape)})"
                  for k in sorted(set(expected) & set(mapped)) if mapped[k].shape != expected[k].shape]
    problems = [_listed(kind, keys) for kind, keys in (
        ("missing key(s)", [f"{prefix}{k}" for k in missing]),
        ("unexpected key(s)", [f"{prefix}{k}" for k in unexpected]),
        ("key(s) with another shape", mismatched),
    ) if keys]
    if problems:
        raise ValueError(f"{what} do not fit the image tower ({tower.cfg.timm_name}, "
                         f"{tower.cfg.image_size} px): " + "; ".join(problems))
    return target, mapped


def load_image_weights(tower: ImageTower, state: Mapping[str, Any]) -> nn.Module:
    """Copy `state` into the tower (or its trunk) after `match_image_weights`; returns the loaded module."""
    target, mapped = match_image_weights(tower, state)
    with torch.no_grad():
        target.load_state_dict(mapped, strict=True)  # copies, casting to the tower's dtype
    return target


def _without_classifier(state: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
    """Drop the classifier weights a timm checkpoint carries and a headless backbone does not have."""
    names = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    own = backbone.state_dict()
    for name in (names,) if isinstance(names, str) else names:
        for key in (f"{name}.weight", f"{name}.bias"):
            if key not in own:
                state.pop(key, None)
    return state


def _listed(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{len(keys)} {kind}: {shown}{more}"
