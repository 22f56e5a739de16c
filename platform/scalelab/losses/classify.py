"""Classification losses of the supervised stage (`task: classify`): pure functions of logits and labels.

Labels come as the pipeline gives them: int64 [B, K], the class indices of each sample, -1 padding.

- softmax: cross-entropy of the first (only) label; per-sample values, summed by the caller.
- sigmoid: one binary cross-entropy per class against the multi-hot target, *summed over classes*
  (big_vision's `sigmoid_xent` for JFT): a per-class mean would shrink the gradient by num_classes,
  which with JFT's 18k classes would need an lr 18k times larger.

Both return per-sample losses (float32 or wider) so a micro-batched step can sum its parts and divide
by the global batch once. `top1_correct`: the top-scoring class is one of the sample's labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["classify_loss", "multi_hot", "top1_correct"]


def multi_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """int64 [B, K] (-1 padding) → {0, 1} [B, num_classes]."""
    target = torch.zeros(labels.shape[0], num_classes + 1, dtype=dtype, device=labels.device)
    # Padding (-1) is written into an extra column that is then dropped.
    target.scatter_(1, torch.where(labels < 0, num_classes, labels), 1.0)
    return target[:, :num_classes]


def classify_loss(logits: Tensor, labels: Tensor, head: str) -> Tensor:
    """Per-sample loss [B] of `logits` [B, C] against `labels` [B, K] (module docstring), in ≥ fp32."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if head == "softmax":
        return F.cross_entropy(logits, labels[:, 0], reduction="none")
    if head == "sigmoid":
        target = multi_hot(labels, logits.shape[1], logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)
    raise ValueError(f"head must be 'softmax' or 'sigmoid', got {head!r}")


def top1_correct(logits: Tensor, labels: Tensor) -> Tensor:
    """bool [B]: the highest logit's class is among the sample's labels."""
    top = logits.argmax(dim=1, keepdim=True)
    return (labels == top).any(dim=1)
