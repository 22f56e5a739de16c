"""Image tower: a timm backbone (ViT, CoAtNet/MaxxViT, ResNet, ...) plus a bias-free projection.

Also home of the BatchNorm → GroupNorm swap: BatchNorm mixes the samples of a micro-batch, which makes
a gradient-cache step (encode micro-batches separately, re-encode later) inexact and makes train-mode
statistics depend on the micro-batch size. A per-sample GroupNorm has neither problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.layers import BatchNormAct2d, GroupNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from scalelab.config import ConfigError, ImageTowerConfig

__all__ = ["ImageTower", "create_backbone", "has_batchnorm", "swap_batchnorm_for_groupnorm"]

# Arguments the tower sets itself; allowing them in timm_kwargs would let a preset silently disagree
# with its spec (e.g. img_size vs image.image_size) or download weights.
_RESERVED_KWARGS = ("img_size", "pretrained", "num_classes", "drop_rate", "drop_path_rate")


def has_batchnorm(module: nn.Module) -> bool:
    """True if any submodule is a BatchNorm (couples samples in train mode)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def _group_norm_for(bn: _BatchNorm) -> nn.Module:
    """A per-sample GroupNorm replacing `bn`, with its affine parameters (and act/drop) carried over."""
    channels = bn.num_features
    # gcd keeps 32 groups where possible (GroupNorm's usual default) while always dividing C.
    groups = math.gcd(32, channels)
    if isinstance(bn, BatchNormAct2d):
        gn: nn.Module = GroupNormAct(
            channels, num_groups=groups, eps=bn.eps, affine=bn.affine, apply_act=False
        )
        gn.act, gn.drop = bn.act, bn.drop  # keep the fused activation and drop layer unchanged
    elif isinstance(bn, nn.BatchNorm2d):
        gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
    else:
        raise ValueError(f"cannot swap {type(bn).__name__} for GroupNorm: only 2-d BatchNorm is supported")
    if bn.affine:
        gn.to(device=bn.weight.device, dtype=bn.weight.dtype)
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn


def swap_batchnorm_for_groupnorm(module: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm2d / BatchNormAct2d under `module` by a GroupNorm; returns it."""
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(module, name, _group_norm_for(child))
        else:
            swap_batchnorm_for_groupnorm(child)
    return module


def _timm_kwargs(cfg: ImageTowerConfig) -> dict[str, Any]:
    """The preset's timm kwargs with lists turned back into tuples (YAML/JSON round trips make lists)."""
    bad = [k for k in _RESERVED_KWARGS if k in cfg.timm_kwargs]
    if bad:
        raise ConfigError(
            f"image.timm_kwargs: {', '.join(bad)} may not be set here; use image.image_size, "
            "image.dropout and image.drop_path (weights are never downloaded)"
        )

    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return tuple(fix(x) for x in v)
        if isinstance(v, Mapping):
            return {k: fix(x) for k, x in v.items()}
        return v

    return {k: fix(v) for k, v in cfg.timm_kwargs.items()}


def create_backbone(cfg: ImageTowerConfig) -> nn.Module:
    """timm.create_model(..., pretrained=False, num_classes=0), passing img_size when the model takes it.

    Whether a model takes img_size is discovered by trying: models with a fixed token grid or
    relative-position tables (ViT, CoAtNet/MaxxViT, Swin) need it, fully convolutional ones (ResNet)
    reject it as an unexpected keyword. A list of names would go stale with every timm release.
    """
    kwargs = dict(
        pretrained=False, num_classes=0, drop_rate=cfg.dropout, drop_path_rate=cfg.drop_path,
        **_timm_kwargs(cfg),
    )
    try:
        return timm.create_model(cfg.timm_name, img_size=cfg.image_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    except RuntimeError as err:  # timm raises RuntimeError for an unknown model name
        raise ConfigError(f"image.timm_name: {err}") from None
    return timm.create_model(cfg.timm_name, **kwargs)


def _feature_dim(backbone: nn.Module) -> int:
    """Width of what the headless backbone returns: pre-logits width when it has a hidden head."""
    hidden = getattr(backbone, "head_hidden_size", None)
    return int(hidden or backbone.num_features)


class ImageTower(nn.Module):
    """timm backbone (classifier removed) → bias-free Linear to embed_dim (not normalised here)."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        # An optimizer hint, set by the trainer from `model.image.lr_mult` / `unlock_at_step`: a module
        # with an lr_mult gets parameter groups of its own (train/optim.param_groups). None: it shares
        # the model's groups.
        self.lr_mult: float | None = None
        self.backbone = create_backbone(cfg)
        if cfg.norm == "group":
            swap_batchnorm_for_groupnorm(self.backbone)
        self.num_features = _feature_dim(self.backbone)
        self.proj = nn.Linear(self.num_features, embed_dim, bias=False)
        # CLIP's projection init: std = width^-1/2 keeps the initial embedding scale independent of width.
        nn.init.normal_(self.proj.weight, std=self.num_features**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B, 3, H, W] → [B, embed_dim]."""
        return self.proj(self.backbone(images))
