"""Pairwise sigmoid contrastive loss (SigLIP, Zhai et al. 2023), dense and tiled.

Every image-text pair is an independent binary problem: with logits z_ij = s · <img_i, txt_j> + b
and labels y_ij = +1 on the diagonal (matching pairs) and −1 elsewhere,

    L = −(1/B) · Σ_ij log σ(y_ij · z_ij).

Following SigLIP the double sum is divided by B (not B²): the loss is "per image, summed over all
texts", which keeps its size and its gradient comparable across batch sizes.

The dense path materialises z; the tiled path is a custom autograd Function that sums the loss one
block×block tile at a time and, in the backward, recomputes each tile and uses

    dL/dz_ij = σ(z_ij) / B  (i ≠ j),    dL/dz_ii = −σ(−z_ii) / B,

so it never holds more than a few tiles, whatever B is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from scalelab.losses._tiling import (
    Scalar,
    ScalarMeta,
    accumulation_dtype,
    as_multiplier,
    backward_tiles,
    check_block_size,
    check_embeddings,
    check_scalar,
    detached_scalar,
    tile_similarity,
    tiles,
)


def sigmoid_loss(
    image_emb: Tensor, text_emb: Tensor, scale: Scalar, bias: Scalar, *, block_size: int | None = None
) -> Tensor:
    """SigLIP loss of matching rows of ``image_emb`` and ``text_emb``, normalised by B.

    Args:
        image_emb: [B, D] image embeddings (normally L2-normalised by the model).
        text_emb: [B, D] text embeddings; row i is the caption of image i.
        scale: multiplier of the similarities (SigLIP: ``t'.exp()``); python number or one-element tensor.
        bias: added to every logit (SigLIP initialises it at −10); python number or one-element tensor.
        block_size: None for the dense B×B computation; an int for block_size×block_size tiles that
            never materialise the B×B matrix.

    Returns:
        A 0-d tensor −(1/B)·Σ_ij log σ(y_ij z_ij); float32 for float16 / bfloat16 embeddings.
    """
    check_embeddings(image_emb, text_emb)
    check_scalar("scale", scale)
    check_scalar("bias", bias)
    if block_size is None:
        return _dense_sigmoid_loss(image_emb, text_emb, scale, bias)
    check_block_size(block_size)
    return _TiledSigmoidLoss.apply(image_emb, text_emb, scale, bias, block_size)


def _dense_sigmoid_loss(image_emb: Tensor, text_emb: Tensor, scale: Scalar, bias: Scalar) -> Tensor:
    n = image_emb.shape[0]
    sim = (image_emb @ text_emb.T).to(accumulation_dtype(image_emb.dtype))
    logits = as_multiplier(scale) * sim + as_multiplier(bias)
    labels = 2.0 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1.0
    return -F.logsigmoid(labels * logits).sum() / n


def _tile_loss_sum(logits: Tensor, on_diagonal: bool) -> Tensor:
    """Σ −log σ(y·z) over one tile; a diagonal tile's own diagonal holds the positives (y = +1).

    logsigmoid, not softplus: F.softplus turns linear above its threshold (20) and drops the e^{−z}
    tail, an error the dense path does not make.
    """
    terms = F.logsigmoid(-logits)
    if on_diagonal:
        terms.diagonal().copy_(F.logsigmoid(logits.diagonal()))
    return -terms.sum()


class _TiledSigmoidLoss(torch.autograd.Function):
    """Tiled SigLIP loss; see the module docstring for the formulas."""

    @staticmethod
    def forward(
        ctx: Any, image_emb: Tensor, text_emb: Tensor, scale: Scalar, bias: Scalar, block_size: int
    ) -> Tensor:
        n = image_emb.shape[0]
        acc = accumulation_dtype(image_emb.dtype)
        s = detached_scalar(scale, acc, image_emb.device)
        b = detached_scalar(bias, acc, image_emb.device)
        total = torch.zeros((), dtype=acc, device=image_emb.device)
        for r0, r1, c0, c1 in tiles(n, block_size):
            logits = s * tile_similarity(image_emb, text_emb, r0, r1, c0, c1) + b
            total += _tile_loss_sum(logits, on_diagonal=r0 == c0)
        ctx.save_for_backward(image_emb, text_emb)
        ctx.scale, ctx.bias, ctx.block_size = s, b, block_size
        ctx.scale_meta, ctx.bias_meta = ScalarMeta.of(scale), ScalarMeta.of(bias)
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        image_emb, text_emb = ctx.saved_tensors
        s, b, n = ctx.scale, ctx.bias, image_emb.shape[0]

        def tile_weight(sim: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
            logits = s * sim + b
            weight = torch.sigmoid(logits) / n
            if r0 == c0:  # positives: d/dz of −log σ(z) is −σ(−z), exact even when σ(z) ≈ 1
                weight.diagonal().copy_(-torch.sigmoid(-logits.diagonal()) / n)
            return weight

        grads = backward_tiles(image_emb, text_emb, s, ctx.block_size, tile_weight)
        g = grad_output.to(grads.scale.dtype)
        needs = ctx.needs_input_grad
        return (
            grads.image.mul_(g).to(image_emb.dtype) if needs[0] else None,
            grads.text.mul_(g).to(text_emb.dtype) if needs[1] else None,
            ctx.scale_meta.grad(grads.scale * g) if needs[2] else None,
            ctx.bias_meta.grad(grads.bias * g) if needs[3] else None,
            None,
        )
