"""Shared machinery of the contrastive losses: input checks, tile walking, and the tiled backward.

Both tiled losses (softmax and sigmoid) look at logits z_ij = s * <img_i, txt_j> (+ b) one square
tile at a time and never hold the B×B matrix. Their backward passes have the same shape: recompute a
tile's similarities, ask the loss for dL/dz on that tile, and fold it into the embedding, scale and
bias gradients. That shared loop lives here; each loss supplies only its per-tile formula.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

Scalar = Tensor | float

# Half-precision inputs keep their matmuls in the input dtype (that is where tensor cores pay off)
# but every exp / log-sum-exp / accumulation runs in float32: bf16 has 8 mantissa bits, too few to
# sum B terms of a softmax denominator or a gradient.
_LOW_PRECISION = (torch.float16, torch.bfloat16)

# dL/dz on one tile, given the tile's unscaled similarities and its row / column ranges.
TileWeight = Callable[[Tensor, int, int, int, int], Tensor]


class TileGrads(NamedTuple):
    """Gradients of a tiled loss before the incoming grad_output is applied (accumulation dtype)."""

    image: Tensor
    text: Tensor
    scale: Tensor
    bias: Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype log-sum-exps and gradient sums are accumulated in for embeddings of ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def check_embeddings(image_emb: Tensor, text_emb: Tensor) -> None:
    """Raise ValueError unless both embeddings are matching, non-empty, floating [B, D] matrices."""
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(emb, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
        if emb.dim() != 2:
            raise ValueError(f"{name} must be 2-d [B, D], got shape {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {emb.dtype}")
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"image_emb has {image_emb.shape[0]} rows but text_emb has {text_emb.shape[0]}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb has embedding dim {image_emb.shape[1]} but text_emb has {text_emb.shape[1]}"
        )
    if image_emb.shape[0] == 0:
        raise ValueError("batch is empty (B=0): a contrastive loss needs at least one image-text pair")
    if image_emb.dtype != text_emb.dtype:
        raise ValueError(f"image_emb is {image_emb.dtype} but text_emb is {text_emb.dtype}")
    if image_emb.device != text_emb.device:
        raise ValueError(f"image_emb is on {image_emb.device} but text_emb is on {text_emb.device}")


def check_scalar(name: str, value: Scalar) -> None:
    """Raise ValueError unless ``value`` is a python number or a one-element floating tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a python number or a one-element tensor, "
                             f"got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"{name} must be a python number or a one-element tensor, got {type(value).__name__}"
        )


def check_block_size(block_size: int) -> None:
    """Raise ValueError unless ``block_size`` is a positive int (bool is rejected: True is not a size)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def detached_scalar(value: Scalar, dtype: torch.dtype, device: torch.device) -> Scalar:
    """A tiled Function's constant view of scale / bias: a python float, or a 0-d tensor in ``dtype``."""
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(dtype=dtype, device=device)
    return float(value)


def as_multiplier(value: Scalar) -> Scalar:
    """A scale / bias ready to broadcast against a matrix: one-element tensors become 0-d (with grad)."""
    return value.reshape(()) if isinstance(value, Tensor) else value


class ScalarMeta(NamedTuple):
    """Shape, dtype and device of a tensor scale / bias, kept by a Function instead of the tensor."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(value: Scalar) -> ScalarMeta | None:
        if not isinstance(value, Tensor):
            return None
        return ScalarMeta(value.shape, value.dtype, value.device)

    def grad(self, grad: Tensor) -> Tensor:
        """Shape and cast a 0-d accumulated gradient to match the input it belongs to (a 0-d CPU
        scale next to CUDA embeddings is legal, and autograd wants its gradient back on the CPU)."""
        return grad.reshape(self.shape).to(dtype=self.dtype, device=self.device)


def tiles(n: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (row_start, row_stop, col_start, col_stop) of every square tile of an n×n matrix.

    Rows and columns share the same bounds, so the diagonal of the matrix lies exactly on the
    diagonals of the tiles with row_start == col_start (the last tile may be smaller but is square).
    """
    bounds = [(start, min(start + block, n)) for start in range(0, n, block)]
    for r0, r1 in bounds:
        for c0, c1 in bounds:
            yield r0, r1, c0, c1


def tile_similarity(image_emb: Tensor, text_emb: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
    """Unscaled similarities img[r0:r1] @ txt[c0:c1].T, in the accumulation dtype."""
    sim = image_emb[r0:r1] @ text_emb[c0:c1].T
    return sim.to(accumulation_dtype(image_emb.dtype))


def diagonal_similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """<img_i, txt_i> for every i, straight from the rows (O(B·D), no matrix needed)."""
    acc = accumulation_dtype(image_emb.dtype)
    return (image_emb.to(acc) * text_emb.to(acc)).sum(dim=-1)


def _add_matmul(target: Tensor, weight: Tensor, rows: Tensor) -> None:
    """target += weight @ rows, with the matmul in the embeddings' dtype and the sum in target's."""
    if weight.dtype == rows.dtype:
        target.addmm_(weight, rows)
    else:
        target += (weight.to(rows.dtype) @ rows).to(target.dtype)


def backward_tiles(
    image_emb: Tensor, text_emb: Tensor, scale: Scalar, block_size: int, tile_weight: TileWeight
) -> TileGrads:
    """Accumulate the gradients of a tiled loss from dL/dz, one recomputed tile at a time.

    With z_ij = s·sim_ij + b and W = dL/dz: dL/dimg = s·W @ txt, dL/dtxt = s·W.T @ img,
    dL/ds = Σ W ⊙ sim, dL/db = Σ W. The factor s is applied once at the end rather than per tile.
    Peak extra memory: a few block×block tiles plus the two B×D accumulators.
    """
    acc = accumulation_dtype(image_emb.dtype)
    grad_image = torch.zeros(image_emb.shape, dtype=acc, device=image_emb.device)
    grad_text = torch.zeros_like(grad_image)
    grad_scale = torch.zeros((), dtype=acc, device=image_emb.device)
    grad_bias = torch.zeros_like(grad_scale)
    for r0, r1, c0, c1 in tiles(image_emb.shape[0], block_size):
        sim = tile_similarity(image_emb, text_emb, r0, r1, c0, c1)
        weight = tile_weight(sim, r0, r1, c0, c1)
        _add_matmul(grad_image[r0:r1], weight, text_emb[c0:c1])
        _add_matmul(grad_text[c0:c1], weight.T, image_emb[r0:r1])
        grad_scale += (weight * sim).sum()
        grad_bias += weight.sum()
    # in place: two fewer B x D temporaries at the batch sizes this exists for
    return TileGrads(grad_image.mul_(scale), grad_text.mul_(scale), grad_scale, grad_bias)
