"""ImageClassifier: the dual encoder's image tower plus a linear head (`task: classify`, BASIC stage 1).

BASIC pre-trains its image tower on JFT labels before the contrastive stage. The classifier holds the
tower under the same name and structure as `DualEncoder` (`image_tower` = `ImageTower`: timm backbone
+ bias-free projection to embed_dim), so the `image_tower.*` keys of a classify run's weights load into
a dual encoder of the same preset unchanged (`model.image.init` of a later contrastive stage).

The head reads the tower's *projected* embedding (unnormalised, embed_dim wide), not the backbone's
features: every transferred key is then trained, the projection included, and the embedding the
contrastive stage starts from is already linearly separable by class (what a locked tower, LiT-style,
needs). The head itself (`head.*`) is not transferred. Returns logits, never a loss (the loss is
`scalelab.losses.classify`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scalelab.config import ModelSpec
from scalelab.models.image import ImageTower

__all__ = ["ImageClassifier"]


class ImageClassifier(nn.Module):
    """`image_tower` (as in DualEncoder) → `head` Linear(embed_dim → num_classes); `config`: its spec."""

    def __init__(self, spec: ModelSpec, num_classes: int, *, head: str = "softmax") -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.config = spec
        self.num_classes = num_classes
        self.image_tower = ImageTower(spec.image, spec.embed_dim)
        self.head = nn.Linear(spec.embed_dim, num_classes)
        # Small random weights, not big_vision's zero head: a zero head passes the tower no gradient
        # until it has grown, which on the synthetic world cost a third of the top-1 after 250 steps
        # (micro preset). A sigmoid head's bias starts at the log-odds of a 1/num_classes prior, so the
        # first steps' BCE is not spent pushing every class's probability down from 1/2.
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.constant_(self.head.bias, -math.log(num_classes - 1) if head == "sigmoid" else 0.0)
        if spec.grad_checkpointing:
            self.image_tower.set_grad_checkpointing(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] → logits [B, num_classes]."""
        return self.head(self.image_tower(images))
