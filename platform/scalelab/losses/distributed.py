"""Gathering embeddings across data-parallel ranks for a global contrastive batch (torch.distributed only).

A contrastive loss over the global batch needs every rank's embeddings. Each rank gathers all of
them (rank order along dim 0) and computes the same global loss L on the gathered batch.

Gradient convention of ``all_gather_with_grad``: its backward all-reduces (SUM) the incoming
gradient over ranks and returns this rank's slice. Every rank computed the same L, so the sum is
d(Σ_ranks L)/d(gathered) = world_size · dL/d(gathered), and rank r receives

    world_size · dL/d(own rows).

Its parameter gradients therefore carry a factor world_size on the contribution of its own rows.
Data-parallel training then AVERAGES gradients over ranks (DDP, DeepSpeed), which divides by
world_size and sums the ranks' contributions: the result is exactly dL/dθ of the global loss. The
factor cancels exactly. Parameters that reach L without going through the gather (the logit scale)
get the same dL/ds on every rank, which averaging leaves unchanged — also exact.

The all-reduce sits inside backward, so every rank must run backward through the gather.
When torch.distributed is not initialised, or the world has one rank, both functions return their
input unchanged (``all_gather_with_grad`` then keeps the ordinary autograd path).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

# Shapes are exchanged as fixed-length int64 vectors [ndim, size_0, ..., size_{k-1}, -1, ...] so that
# a rank with a different number of dims is reported instead of breaking the collective.
_MAX_DIMS = 8


def _world_size(group: Any) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _check_equal_shapes(x: Tensor, group: Any, world_size: int) -> None:
    """Raise ValueError on every rank (so none is left waiting) unless all ranks hold x of one shape.

    dist.all_gather with unequal shapes fails obscurely or hangs, depending on the backend.
    """
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather supports tensors of at most {_MAX_DIMS} dims, got {x.dim()}")
    meta = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64, device=x.device)
    meta[0] = x.dim()
    if x.dim():
        meta[1 : x.dim() + 1] = torch.tensor(x.shape, dtype=torch.int64)
    metas = [torch.empty_like(meta) for _ in range(world_size)]
    dist.all_gather(metas, meta, group=group)
    shapes = [tuple(m[1 : int(m[0]) + 1].tolist()) for m in metas]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"all_gather needs the same shape on every rank, got {shapes} (in rank order)")


def _gather_cat(x: Tensor, group: Any, world_size: int) -> Tensor:
    _check_equal_shapes(x, group, world_size)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


def all_gather(x: Tensor, group: Any = None) -> Tensor:
    """Concatenate ``x`` from every rank of ``group`` along dim 0, in rank order, without autograd.

    Every rank must pass a tensor of the same shape (checked; ValueError otherwise). Returns ``x``
    itself when torch.distributed is not initialised or the group has a single rank.
    """
    world_size = _world_size(group)
    if world_size == 1:
        return x
    with torch.no_grad():
        return _gather_cat(x.detach(), group, world_size)


def all_gather_with_grad(x: Tensor, group: Any = None) -> Tensor:
    """Like :func:`all_gather`, but differentiable; see the module docstring for the gradient convention.

    Returns ``x`` itself (autograd intact) when torch.distributed is not initialised or the group
    has a single rank.
    """
    world_size = _world_size(group)
    if world_size == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all_gather + cat. Backward: all_reduce(SUM) of the grad, then this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        world_size = _world_size(group)
        ctx.group, ctx.rows, ctx.rank = group, x.shape[0], dist.get_rank(group)
        return _gather_cat(x, group, world_size)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        # Sum over ranks: each rank's grad_output is its own loss's gradient w.r.t. ALL gathered rows.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None
