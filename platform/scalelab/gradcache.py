"""The gradient-cache contrastive step: a global batch larger than memory, with exact gradients.

BASIC ("online gradient caching") and GradCache (Gao et al. 2021) decouple the contrastive batch from
activation memory:

1. encode every micro-batch of both towers without autograd, keeping only the embeddings and the RNG
   state each micro-batch started from;
2. compute the full-batch loss on the detached embeddings and its gradient with respect to the
   embeddings and to the temperature (and bias);
3. re-encode each micro-batch with autograd under its saved RNG state (so dropout, stochastic depth
   and augmentation noise replay bit for bit) and backpropagate the cached embedding gradient through
   the surrogate `sum(emb * grad_emb)`. The temperature's gradient is added exactly once.

Every parameter's `.grad` then equals what one backward of the full-batch loss gives (tested in
float64), while activation memory is one micro-batch of each tower. This module knows no training
engine: the caller passes a `backward(loss)` callable (plain autograd by default; `engine.backward`
in `train/`).

A locked image tower (LiT, `lock_image=True`) is a fixed function: its embeddings from phase 1 are final,
so it is encoded once and never replayed, and no backward runs through it; only the text tower (and
the temperature) are replayed, and its parameters get no gradient. One no-grad forward instead of two
forwards and a backward: the image tower's share of a step costs about a quarter of an unlocked one.

BatchNorm semantics: a train-mode BatchNorm normalises each micro-batch with its own statistics, as in
data-parallel training ("ghost" batch norm), so gradients equal the full-batch gradient of the model
*with per-micro-batch statistics*. Running statistics are updated once per micro-batch, in the
re-forward only: the no-grad pass restores them. A warning says so; presets can swap BatchNorm for a
per-sample GroupNorm (`image.norm: group`) to make the step exact in the plain sense.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from scalelab.losses import all_gather, contrastive_loss, sigmoid_loss

__all__ = [
    "BatchNormCacheWarning",
    "CachedStepResult",
    "NonFiniteError",
    "ReplayMismatchWarning",
    "cached_step",
    "micro_batch_slices",
]

Backward = Callable[[Tensor], None]
Encode = Callable[[Tensor], Tensor]
LOSSES = ("softmax", "sigmoid")
ON_NONFINITE = ("raise", "skip")
# A replayed forward must reproduce the cached one; beyond these gaps something is non-deterministic.
_REPLAY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


class NonFiniteError(FloatingPointError):
    """Embeddings or the loss were NaN/inf; raised before any gradient is accumulated.

    `loss` and `logit_scale` are the values the step computed (the loss may be NaN).
    """

    def __init__(self, message: str, *, loss: float = math.nan, logit_scale: float = math.nan) -> None:
        super().__init__(message)
        self.loss, self.logit_scale = loss, logit_scale


class BatchNormCacheWarning(UserWarning):
    """The model has train-mode BatchNorm: gradients use per-micro-batch statistics."""


class ReplayMismatchWarning(UserWarning):
    """The re-forward did not reproduce the cached embeddings (a non-deterministic layer?)."""


@dataclass(frozen=True)
class CachedStepResult:
    """What one cached step measured. Gradients themselves are in the parameters' `.grad`."""

    loss: float
    logit_scale: float
    image_accuracy: float | None
    text_accuracy: float | None
    image_emb_norm: float
    text_emb_norm: float
    image_grad_norm: float
    text_grad_norm: float
    replay_max_abs_diff: float
    image_micro_batches: int
    text_micro_batches: int
    backward_calls: int
    timings: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # on_nonfinite="skip" and a NaN/inf was found: no backward call was made
    nonfinite: str | None = None  # what was NaN/inf, when skipped


def micro_batch_slices(batch: int, micro: int) -> list[slice]:
    """Consecutive slices of at most `micro` rows covering `batch` rows (the last may be shorter)."""
    if micro <= 0:
        raise ValueError(f"micro-batch size must be a positive integer, got {micro}")
    return [slice(s, min(s + micro, batch)) for s in range(0, batch, micro)]


def cached_step(
    model: nn.Module,
    images: Tensor,
    tokens: Tensor,
    *,
    micro_batch_size: int,
    text_micro_batch_size: int | None = None,
    loss: str = "softmax",
    block_size: int | None = None,
    backward: Backward | None = None,
    distributed: bool = False,
    compute_accuracy: bool = True,
    on_nonfinite: str = "raise",
    lock_image: bool = False,
) -> CachedStepResult:
    """One gradient-cache step: accumulate the full-batch gradient into every parameter's `.grad`.

    `model` needs `encode_image`, `encode_text` and a `temperature()` submodule returning
    `(logit_scale, logit_bias_or_None)`, as `scalelab.models.DualEncoder` has. The optimizer step is
    the caller's. `backward(loss)` is called once per micro-batch *pair* (image micro-batch k with
    text micro-batch k: max of the two counts); default `loss.backward()`. With `distributed=True`
    (torch.distributed initialised) the loss sees every
    rank's embeddings and each rank backpropagates only its own rows; gradients are scaled so that
    data-parallel *averaging* over ranks yields the exact global-batch gradient.

    Non-finite embeddings or loss raise `NonFiniteError` before anything is accumulated; with
    `on_nonfinite="skip"` the step instead returns a result with `skipped=True` (loss as computed,
    perhaps NaN) without calling `backward`. Finiteness is judged on the *gathered* batch and agreed
    by an all-reduce, so every rank raises or skips together: a rank stopping alone would leave the
    others waiting in the next collective.

    `lock_image=True`: the image tower is locked (module docstring): encoded once without autograd,
    not replayed, no gradient; `backward` is then called once per *text* micro-batch. The caller puts
    the tower in eval mode (a locked tower must be a fixed function for its cached embeddings to be
    exact).
    """
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, got {on_nonfinite!r}")
    text_micro = text_micro_batch_size or micro_batch_size
    img_slices, txt_slices = _check_inputs(model, images, tokens, micro_batch_size, text_micro, loss)
    _warn_batchnorm(model)
    backward = backward or _autograd_backward
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    with _frozen_norm_statistics(model):
        image = _encode_no_grad(model.encode_image, images, img_slices)
        text = _encode_no_grad(model.encode_text, tokens, txt_slices)
    after_cache_rng = _capture_rng(images.device)
    timings["cache_forward_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        grads = _loss_and_grads(model, image.emb, text.emb, loss, block_size, distributed)
    except NonFiniteError as error:
        if on_nonfinite == "raise":
            raise
        timings.update(loss_s=time.perf_counter() - t0, replay_backward_s=0.0)
        return _skipped_result(error, image, text, timings)
    image.grad, text.grad = grads.img, grads.txt
    timings["loss_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    replayed = (text,) if lock_image else (image, text)
    replay_diff, calls = _replay(model, replayed, grads, backward)
    _restore_rng(after_cache_rng)  # the step consumes the RNG as one forward would
    timings["replay_backward_s"] = time.perf_counter() - t0
    _warn_replay(replay_diff, image.emb.dtype)

    accuracy = _matching_accuracy(grads.img_all, grads.txt_all) if compute_accuracy else (None, None)
    return CachedStepResult(
        loss=grads.loss,
        logit_scale=grads.logit_scale,
        image_accuracy=accuracy[0],
        text_accuracy=accuracy[1],
        image_emb_norm=image.emb.norm(dim=-1).mean().item(),
        text_emb_norm=text.emb.norm(dim=-1).mean().item(),
        image_grad_norm=grads.img.norm().item(),
        text_grad_norm=grads.txt.norm().item(),
        replay_max_abs_diff=replay_diff,
        image_micro_batches=len(img_slices),
        text_micro_batches=len(txt_slices),
        backward_calls=calls,
        timings=timings,
    )


# --------------------------------------------------------------------------- checks
def _check_inputs(
    model: nn.Module, images: Tensor, tokens: Tensor, micro: int, text_micro: int, loss: str
) -> tuple[list[slice], list[slice]]:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, L] token ids, got shape {tuple(tokens.shape)}")
    if images.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"image and text batch sizes differ: images has {images.shape[0]} samples, "
            f"tokens has {tokens.shape[0]}"
        )
    if images.shape[0] == 0:
        raise ValueError("empty batch: images and tokens have 0 samples")
    for name, value in (("micro_batch_size", micro), ("text_micro_batch_size", text_micro)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if loss == "sigmoid" and model.temperature()[1] is None:
        raise ValueError("loss='sigmoid' needs a model with a logit bias (create it with logit_bias=True)")
    batch = images.shape[0]
    return micro_batch_slices(batch, micro), micro_batch_slices(batch, text_micro)


def _nonfinite(img_all: Tensor, txt_all: Tensor, value: Tensor, world: int) -> str | None:
    """What in the (gathered) step is NaN/inf, or None."""
    for what, emb in (("image embeddings", img_all), ("text embeddings", txt_all)):
        if torch.isfinite(emb.sum()):  # no B x D mask of the gathered batch unless something is off
            continue
        bad = ~torch.isfinite(emb).all(dim=-1)
        if bad.any():
            rows = bad.nonzero().flatten()[:5].tolist()
            where = " of the global batch" if world > 1 else ""
            return (f"non-finite {what} in {int(bad.sum())} of {emb.shape[0]} samples{where} "
                    f"(first rows: {rows})")
    return None if torch.isfinite(value).all() else f"the contrastive loss is {value.item()}"


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _warn_batchnorm(model: nn.Module) -> None:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        warnings.warn(
            "model has BatchNorm in training mode: each micro-batch is normalised with its own "
            "statistics (gradients equal the full-batch gradient of that per-micro-batch model), and "
            "running statistics are updated once per micro-batch in the re-forward. Use image.norm=group "
            "for a per-sample norm that makes the cached step exact.",
            BatchNormCacheWarning,
            stacklevel=3,
        )


def _warn_replay(diff: float, dtype: torch.dtype) -> None:
    tol = _REPLAY_TOLERANCE.get(dtype, 5e-2)
    if diff > tol:
        warnings.warn(
            f"re-forward differs from the cached forward by {diff:.3g} (> {tol:g}): a layer is not "
            "deterministic under RNG replay, so gradients are approximate",
            ReplayMismatchWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- RNG and norm state
def _capture_rng(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """CPU generator state, plus the CUDA generator of `device` when it is a CUDA device."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _restore_rng(state: tuple[Tensor, Tensor | None], device: torch.device | None = None) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class _RngStates:
    """The RNG state each micro-batch started from, stored as rows of one preallocated buffer.

    A list of thousands of small (~5 KB) state tensors, each allocated between two micro-batches'
    activations, fragments the CPU heap: measured +83 MB RSS at B=65536 for 1.3 MB of states.
    """

    def __init__(self, count: int, device: torch.device) -> None:
        self.device = device
        cpu, cuda = _capture_rng(device)
        self.cpu = cpu.new_empty((count, cpu.numel()))
        self.cuda = cuda.new_empty((count, cuda.numel())) if cuda is not None else None

    def save(self, index: int) -> None:
        cpu, cuda = _capture_rng(self.device)
        self.cpu[index].copy_(cpu)
        if self.cuda is not None:
            self.cuda[index].copy_(cuda)

    def restore(self, index: int) -> None:
        cuda = self.cuda[index].clone() if self.cuda is not None else None
        _restore_rng((self.cpu[index].clone(), cuda), self.device)


class _frozen_norm_statistics:
    """Restore BatchNorm running statistics after the no-grad pass, so they update only in the replay."""

    def __init__(self, model: nn.Module) -> None:
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        self.saved: list[dict[str, Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None}
                      for m in self.norms]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for module, buffers in zip(self.norms, self.saved):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


# --------------------------------------------------------------------------- the three phases
@dataclass
class _TowerCache:
    """One tower's first pass: what phase 3 needs to replay it."""

    encode: Encode
    batch: Tensor
    slices: list[slice]
    rng: _RngStates  # the RNG state each micro-batch started from
    emb: Tensor  # detached embeddings of the local batch
    grad: Tensor | None = None  # d loss / d emb, filled in by phase 2


def _encode_no_grad(encode: Encode, batch: Tensor, slices: list[slice]) -> _TowerCache:
    """Phase 1: embeddings of every micro-batch, and the RNG state each one started from."""
    states = _RngStates(len(slices), batch.device)
    out: Tensor | None = None
    with torch.no_grad():
        for k, sl in enumerate(slices):
            states.save(k)
            emb = encode(batch[sl])
            # One preallocated [B, D] buffer, not a list of chunks to concatenate: thousands of small
            # long-lived chunks interleaved with freed activations fragment the CPU heap (measured:
            # +450 MB RSS at B=65536 with chunks, +17 MB with this buffer), and cat would copy twice.
            if out is None:
                out = emb.new_empty((slices[-1].stop, *emb.shape[1:]))
            out[sl] = emb
    return _TowerCache(encode, batch, slices, states, out)


@dataclass
class _CachedGrads:
    loss: float
    logit_scale: float
    img: Tensor  # d loss / d local image embeddings (already scaled for DP averaging)
    txt: Tensor
    scale: Tensor  # d loss / d logit_scale
    bias: Tensor | None
    img_all: Tensor  # gathered embeddings (for statistics)
    txt_all: Tensor


def _loss_and_grads(
    model: nn.Module, img: Tensor, txt: Tensor, loss: str, block_size: int | None, distributed: bool
) -> _CachedGrads:
    """Phase 2: the full-batch loss on detached embeddings and its gradient w.r.t. each input."""
    logit_scale, logit_bias = model.temperature()
    world, rank = _world(distributed)
    img_all = all_gather(img) if world > 1 else img
    txt_all = all_gather(txt) if world > 1 else txt
    # The loss in at least fp32 (bf16 embeddings: logits of a large batch summed in bf16 lose the
    # small differences the loss is about); fp32/fp64 embeddings are used as they are.
    dtype = torch.promote_types(img_all.dtype, torch.float32)
    img_leaf = img_all.detach().to(dtype).requires_grad_(True)
    txt_leaf = txt_all.detach().to(dtype).requires_grad_(True)
    scale_leaf = logit_scale.detach().to(dtype).clone().requires_grad_(True)
    leaves = [img_leaf, txt_leaf, scale_leaf]
    with torch.enable_grad():
        if loss == "softmax":
            value = contrastive_loss(img_leaf, txt_leaf, scale_leaf.exp(), block_size=block_size)
        else:
            bias_leaf = logit_bias.detach().to(dtype).clone().requires_grad_(True)
            leaves.append(bias_leaf)
            value = sigmoid_loss(img_leaf, txt_leaf, scale_leaf.exp(), bias_leaf, block_size=block_size)
        # Checked after the gather: a NaN in one rank's rows then reaches every rank's loss, and the
        # all-reduce makes the decision common even if some rank's check differed.
        problem = _nonfinite(img_all, txt_all, value, world)
        if _any_rank(problem is not None, value.device, world):
            problem = problem or "another rank's step was non-finite"
            raise NonFiniteError(f"{problem}; no gradient was accumulated", loss=value.item(),
                                 logit_scale=logit_scale.item())
        found = torch.autograd.grad(value, leaves)
    return _CachedGrads(
        loss=value.item(),
        logit_scale=logit_scale.item(),
        img=_local_rows(found[0], rank, world),
        txt=_local_rows(found[1], rank, world),
        scale=found[2],
        bias=found[3] if len(found) > 3 else None,
        img_all=img_all,
        txt_all=txt_all,
    )


def _skipped_result(error: NonFiniteError, image: _TowerCache, text: _TowerCache,
                    timings: dict[str, float]) -> CachedStepResult:
    nan = math.nan  # nothing was backpropagated or replayed: those measures do not exist
    return CachedStepResult(
        loss=error.loss, logit_scale=error.logit_scale, image_accuracy=None, text_accuracy=None,
        image_emb_norm=image.emb.norm(dim=-1).mean().item(),
        text_emb_norm=text.emb.norm(dim=-1).mean().item(),
        image_grad_norm=nan, text_grad_norm=nan, replay_max_abs_diff=nan,
        image_micro_batches=len(image.slices), text_micro_batches=len(text.slices), backward_calls=0,
        timings=timings, skipped=True, nonfinite=str(error),
    )


def _local_rows(grad: Tensor, rank: int, world: int) -> Tensor:
    """This rank's rows of a gathered embedding gradient, scaled for data-parallel averaging.

    Each rank's rows feed the global loss once; DP averaging divides every gradient by `world`, so
    multiply back. (The temperature gradient is the same on every rank; averaging leaves it as is.)
    """
    if world == 1:
        return grad  # no copy: at B = 65536+ every B x D copy shows in the memory benchmark
    rows = grad.shape[0] // world
    return grad[rank * rows : (rank + 1) * rows] * world


def _replay(
    model: nn.Module, towers: Sequence[_TowerCache], grads: _CachedGrads, backward: Backward
) -> tuple[float, int]:
    """Phase 3: re-encode each micro-batch under its saved RNG state; backprop the cached gradient.

    Image micro-batch k and text micro-batch k share one backward call: half the calls (and, under
    ZeRO-2/3, half the gradient reductions) for the activations of one micro-batch of each tower.
    Returns the largest deviation of a re-forward from its cached embeddings, and the call count.
    """
    calls = max(len(t.slices) for t in towers)
    max_diff = 0.0
    for k in range(calls):
        with torch.enable_grad():
            # the temperature's gradient enters exactly once, with the first call
            surrogate = _temperature_surrogate(model, grads) if k == 0 else 0.0
            for tower in towers:
                if k >= len(tower.slices):
                    continue
                sl = tower.slices[k]
                tower.rng.restore(k)
                emb = tower.encode(tower.batch[sl])
                surrogate = surrogate + torch.sum(emb * tower.grad[sl])
                max_diff = max(max_diff, (emb.detach() - tower.emb[sl]).abs().max().item())
        backward(surrogate)
    return max_diff, calls


def _temperature_surrogate(model: nn.Module, grads: _CachedGrads) -> Tensor:
    """A term whose gradient w.r.t. logit_scale (and bias) is exactly the cached one."""
    logit_scale, logit_bias = model.temperature()
    term = torch.sum(logit_scale * grads.scale.to(logit_scale.dtype))
    if grads.bias is not None and logit_bias is not None:
        term = term + torch.sum(logit_bias * grads.bias.to(logit_bias.dtype))
    return term


# --------------------------------------------------------------------------- helpers
def _autograd_backward(loss: Tensor) -> None:
    loss.backward()


def _world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 1, 0
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


def _matching_accuracy(img: Tensor, txt: Tensor, rows_per_chunk: int = 1 << 22) -> tuple[float, float]:
    """In-batch retrieval accuracy both ways, in row chunks so that no BxB matrix is built."""
    batch = img.shape[0]
    chunk = max(1, min(batch, rows_per_chunk // batch))
    target = torch.arange(batch, device=img.device)
    hits_i = hits_t = 0
    for s in range(0, batch, chunk):
        hits_i += int((img[s : s + chunk] @ txt.T).argmax(dim=1).eq(target[s : s + chunk]).sum())
        hits_t += int((txt[s : s + chunk] @ img.T).argmax(dim=1).eq(target[s : s + chunk]).sum())
    return hits_i / batch, hits_t / batch
