"""Symmetric softmax contrastive loss (CLIP / ALIGN / BASIC), dense and tiled.

For a batch of B image-text pairs with embeddings img, txt ∈ R^{B×D} and a similarity multiplier s
(``model.logit_scale.exp()``), the logits are z = s · img @ txt.T with the positive pairs on the
diagonal, and

    L = ½ · ( mean_i CE(z[i, :], i) + mean_j CE(z[:, j], j) )
      = (1 / 2B) · Σ_i ( lse_j z_ij + lse_j z_ji − 2 z_ii ).

The dense path materialises z (O(B²) memory, plain autograd). The tiled path is a custom autograd
Function that only ever holds block×block tiles of z: the forward accumulates the row and column
log-sum-exps tile by tile (as in Inf-CL), the backward recomputes each tile and uses

    dL/dz_ij = (P_ij + Q_ij) / 2B − δ_ij / B,   P = row softmax of z, Q = column softmax of z,

so its memory is O(B·D + block²) whatever B is — the point when B is in the tens of thousands.
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
    diagonal_similarity,
    tile_similarity,
    tiles,
)


def contrastive_loss(
    image_emb: Tensor, text_emb: Tensor, scale: Scalar, *, block_size: int | None = None
) -> Tensor:
    """Symmetric softmax contrastive loss of matching rows of ``image_emb`` and ``text_emb``.

    Args:
        image_emb: [B, D] image embeddings (normally L2-normalised by the model).
        text_emb: [B, D] text embeddings; row i is the caption of image i.
        scale: multiplier of the similarities, ``logit_scale.exp()``; a python number or a
            one-element tensor (gradients flow into it when it requires grad).
        block_size: None for the dense B×B computation; an int for the tiled computation with
            block_size×block_size tiles, which never materialises the B×B matrix.

    Returns:
        A 0-d tensor: the mean of the image→text and text→image cross-entropies. For float16 /
        bfloat16 embeddings it is float32 (the log-sum-exps are computed in float32).
    """
    check_embeddings(image_emb, text_emb)
    check_scalar("scale", scale)
    if block_size is None:
        return _dense_contrastive_loss(image_emb, text_emb, scale)
    check_block_size(block_size)
    return _TiledContrastiveLoss.apply(image_emb, text_emb, scale, block_size)


def _dense_contrastive_loss(image_emb: Tensor, text_emb: Tensor, scale: Scalar) -> Tensor:
    # Upcast the similarities (not the embeddings) so half-precision inputs keep a half matmul but
    # get a float32 softmax, matching the tiled path's numerics.
    sim = (image_emb @ text_emb.T).to(accumulation_dtype(image_emb.dtype))
    logits = as_multiplier(scale) * sim
    targets = torch.arange(image_emb.shape[0], device=image_emb.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _tiled_log_sum_exps(
    image_emb: Tensor, text_emb: Tensor, scale: Scalar, block_size: int
) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exps of z = scale · img @ txt.T, merged tile by tile with logaddexp."""
    n = image_emb.shape[0]
    acc = accumulation_dtype(image_emb.dtype)
    row_lse = torch.full((n,), float("-inf"), dtype=acc, device=image_emb.device)
    col_lse = torch.full_like(row_lse, float("-inf"))
    for r0, r1, c0, c1 in tiles(n, block_size):
        logits = scale * tile_similarity(image_emb, text_emb, r0, r1, c0, c1)
        # logaddexp(-inf, x) == x exactly, so the -inf start needs no special first tile.
        row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], logits.logsumexp(dim=1))
        col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], logits.logsumexp(dim=0))
    return row_lse, col_lse


class _TiledContrastiveLoss(torch.autograd.Function):
    """Tiled softmax contrastive loss; see the module docstring for the formulas."""

    @staticmethod
    def forward(
        ctx: Any, image_emb: Tensor, text_emb: Tensor, scale: Scalar, block_size: int
    ) -> Tensor:
        n = image_emb.shape[0]
        acc = accumulation_dtype(image_emb.dtype)
        s = detached_scalar(scale, acc, image_emb.device)
        row_lse, col_lse = _tiled_log_sum_exps(image_emb, text_emb, s, block_size)
        positives = s * diagonal_similarity(image_emb, text_emb)
        loss = (row_lse.sum() + col_lse.sum() - 2.0 * positives.sum()) / (2 * n)
        ctx.save_for_backward(image_emb, text_emb, row_lse, col_lse)
        ctx.scale, ctx.scale_meta, ctx.block_size = s, ScalarMeta.of(scale), block_size
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        image_emb, text_emb, row_lse, col_lse = ctx.saved_tensors
        s, n = ctx.scale, image_emb.shape[0]

        def tile_weight(sim: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
            logits = s * sim
            p = torch.exp(logits - row_lse[r0:r1, None])
            q = torch.exp(logits - col_lse[None, c0:c1])
            weight = (p + q) / (2 * n)
            if r0 == c0:  # a diagonal tile holds the positives: the target term −δ_ij / B
                weight.diagonal().sub_(1.0 / n)
            return weight

        grads = backward_tiles(image_emb, text_emb, s, ctx.block_size, tile_weight)
        g = grad_output.to(grads.scale.dtype)
        needs = ctx.needs_input_grad
        return (
            grads.image.mul_(g).to(image_emb.dtype) if needs[0] else None,
            grads.text.mul_(g).to(text_emb.dtype) if needs[1] else None,
            ctx.scale_meta.grad(grads.scale * g) if needs[2] else None,
            None,
        )
