"""Losses as pure functions of embeddings, scale (and bias), plus cross-rank gathers.

- :func:`contrastive_loss` — symmetric softmax loss (CLIP / ALIGN / BASIC), dense or tiled.
- :func:`sigmoid_loss` — pairwise sigmoid loss (SigLIP), dense or tiled.
- :func:`classify_loss` — softmax cross-entropy / summed sigmoid BCE of the supervised stage.
- :func:`all_gather`, :func:`all_gather_with_grad` — build the global batch from data-parallel ranks.

Only torch is imported here: no engine, tracker or cluster framework.
"""

from scalelab.losses.classify import classify_loss, multi_hot, top1_correct
from scalelab.losses.distributed import all_gather, all_gather_with_grad
from scalelab.losses.sigmoid import sigmoid_loss
from scalelab.losses.softmax import contrastive_loss

__all__ = ["all_gather", "all_gather_with_grad", "classify_loss", "contrastive_loss", "multi_hot",
           "sigmoid_loss", "top1_correct"]
