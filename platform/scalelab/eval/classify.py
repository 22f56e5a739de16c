"""Top-1 / top-5 of an image classifier (`task: classify`) on held-out labelled ImageFolder splits.

A split is `<dir>/<class folder>/<image>`; class folder i (in sorted order) is label i, the order
`scalelab data from-labels` and the synthetic world use for their labels. A split may hold fewer
classes than the head (the synthetic world's 23 object classes are the first 23 of its 33 multi-label
classes); the ranking is over all of the head's classes. Ties count against the true class, as in the
zero-shot evaluation, so a collapsed model scores 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from scalelab.eval.datasets import load_image_folder
from scalelab.eval.zeroshot import eval_mode

__all__ = ["evaluate_classifier", "topk_accuracy"]


def topk_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  batch_size: int = 256) -> dict[str, float]:
    """`top1` and `top5` (k clipped to the number of classes) of `model(images)` logits, in [0, 1]."""
    if len(images) == 0 or len(labels) != len(images):
        raise ValueError(f"need as many labels as images (>0), got {len(labels)} for {len(images)}")
    device = next(model.parameters()).device
    ranks = []
    with eval_mode(model):
        for a in range(0, len(images), batch_size):
            logits = model(images[a:a + batch_size].to(device)).float()
            y = labels[a:a + batch_size].to(device)
            if int(y.max()) >= logits.shape[1]:
                raise ValueError(f"label {int(y.max())} outside the head's {logits.shape[1]} classes")
            true = logits.gather(1, y[:, None])
            ranks.append(((logits >= true).sum(dim=1) - 1).cpu())  # others scoring ≥ the true class
    rank = torch.cat(ranks)
    classes = logits.shape[1]
    return {"top1": float((rank < 1).double().mean()),
            "top5": float((rank < min(5, classes)).double().mean())}


def evaluate_classifier(model: nn.Module, sets: Mapping[str, str | Path], image_size: int, *,
                        batch_size: int = 256) -> dict[str, float]:
    """Metrics of every split under stable keys `eval/classify/<split>/top1` and `/top5`."""
    out: dict[str, float] = {}
    for name, directory in sets.items():
        data = load_image_folder(directory, image_size, templates=False)
        metrics = topk_accuracy(model, data.images, data.labels, batch_size=batch_size)
        out.update({f"eval/classify/{name}/{k}": v for k, v in metrics.items()})
    return out
