"""DualEncoder: image tower + text tower + learnable temperature; returns embeddings, never a loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.config import MAX_LOGIT_SCALE, ModelSpec
from scalelab.models.image import ImageTower
from scalelab.models.text import TextTower

__all__ = ["DualEncoder", "Temperature"]


class Temperature(nn.Module):
    """Holds `logit_scale` (log of the inverse temperature) and, optionally, `logit_bias`.

    A submodule of its own so the training code can read the values by calling it: under DeepSpeed
    ZeRO-3 a module's partitioned parameters are gathered only while that module's forward runs, so
    `model.temperature()` returns usable tensors where `model.temperature.logit_scale` would be empty.
    """

    def __init__(self, init_logit_scale: float, logit_bias: bool, init_logit_bias: float) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if logit_bias else None

    def forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.logit_scale, self.logit_bias


class DualEncoder(nn.Module):
    """CLIP/ALIGN/BASIC dual encoder on one device; `config` is the ModelSpec it was built from."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.config = spec
        self.image_tower = ImageTower(spec.image, spec.embed_dim)
        self.text_tower = TextTower(spec.text, spec.embed_dim)
        self.temperature = Temperature(spec.init_logit_scale, spec.logit_bias, spec.init_logit_bias)
        self.image_locked = False  # see lock_image_tower
        if spec.grad_checkpointing:
            self.set_grad_checkpointing(True)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.temperature.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return self.temperature.logit_bias

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] → L2-normalised [B, embed_dim]."""
        return F.normalize(self.image_tower(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [B, L] (0 = padding, L ≤ context_length) → L2-normalised [B, embed_dim]."""
        return F.normalize(self.text_tower(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings); the loss is a separate pure function (scalelab.losses)."""
        return self.encode_image(images), self.encode_text(tokens)

    def lock_image_tower(self, locked: bool = True) -> DualEncoder:
        """LiT's locked image tower: in eval mode while `locked`, whatever `train()` is called with.

        A locked tower must not move at all: eval mode keeps BatchNorm's running statistics still and
        turns dropout / stochastic depth off, so a locked tower is a fixed function of its input (LiT
        locks the tower entirely). Unlocking restores the mode of the rest of the model. Gradients are
        the trainer's business: it freezes a tower locked for good (requires_grad False) and keeps one
        that unlocks later in its optimizer; the cached step simply never backpropagates through it.
        """
        self.image_locked = locked
        return self.train(self.training)

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        if self.image_locked:
            self.image_tower.eval()
        return self

    @torch.no_grad()
    def clamp_(self) -> DualEncoder:
        """Clamp logit_scale to ≤ ln 100 in place (CLIP: after every optimizer step, so the temperature
        cannot fall below 0.01 and blow up the logits)."""
        self.temperature.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers (recompute blocks in backward to save memory)."""
        self.image_tower.set_grad_checkpointing(enable)
        self.text_tower.set_grad_checkpointing(enable)
