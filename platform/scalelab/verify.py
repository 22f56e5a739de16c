"""Self-check of the exactness claim on this machine: cached step == one full-batch backward.

Used by `scalelab check`. The reference computes the embeddings micro-batch by
micro-batch *inside one autograd graph* (so dropout draws the same noise in the same order as the
cache's first pass) and calls backward once on the full-batch loss; the cached step must reproduce
every parameter gradient, the temperature's included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from scalelab.gradcache import cached_step, micro_batch_slices
from scalelab.losses import contrastive_loss, sigmoid_loss
from scalelab.models import DualEncoder, create_model

__all__ = ["VerifyReport", "reference_gradients", "verify_cached_step"]


@dataclass(frozen=True)
class VerifyReport:
    preset: str
    batch: int
    micro_batch_size: int
    loss: str
    block_size: int | None
    max_rel_err: float
    worst_param: str
    n_params: int
    loss_value: float
    seconds: float
    tolerance: float = 1e-9

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tolerance

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (
            f"{verdict}: preset={self.preset} B={self.batch} micro={self.micro_batch_size} loss={self.loss} "
            f"block={self.block_size}: {self.n_params} parameter tensors, max relative gradient error "
            f"{self.max_rel_err:.2e} (worst: {self.worst_param}, tolerance {self.tolerance:g}), "
            f"loss {self.loss_value:.6f}, {self.seconds:.1f}s"
        )


def reference_gradients(
    model: DualEncoder, images: torch.Tensor, tokens: torch.Tensor, micro: int, loss: str
) -> dict[str, torch.Tensor]:
    """Gradients of one backward of the full-batch loss (forward chunked as the cache chunks it)."""
    model.zero_grad(set_to_none=True)
    slices = micro_batch_slices(images.shape[0], micro)
    img = torch.cat([model.encode_image(images[s]) for s in slices])
    txt = torch.cat([model.encode_text(tokens[s]) for s in slices])
    scale = model.logit_scale.exp()
    if loss == "softmax":
        value = contrastive_loss(img, txt, scale)
    else:
        value = sigmoid_loss(img, txt, scale, model.logit_bias)
    value.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def verify_cached_step(
    preset: str = "micro",
    batch: int = 48,
    micro_batch_size: int = 7,
    loss: str = "softmax",
    block_size: int | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Compare the cached step with the full-batch reference in float64, dropout on in both towers."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = create_model(
        preset, image={"dropout": 0.1, "drop_path": 0.1}, text={"dropout": 0.1}, logit_bias=loss == "sigmoid"
    ).double().train()
    spec = model.config
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, dtype=torch.float64)
    lengths = torch.randint(1, spec.context_length + 1, (batch,))
    tokens = torch.randint(1, spec.vocab_size, (batch, spec.context_length))
    tokens[torch.arange(spec.context_length)[None, :] >= lengths[:, None]] = 0

    rng = torch.get_rng_state()
    expected = reference_gradients(model, images, tokens, micro_batch_size, loss)
    torch.set_rng_state(rng)
    model.zero_grad(set_to_none=True)
    result = cached_step(model, images, tokens, micro_batch_size=micro_batch_size, loss=loss,
                         block_size=block_size)
    worst, worst_name = 0.0, ""
    for name, param in model.named_parameters():
        ref = expected.get(name)
        if ref is None:
            continue
        got = param.grad if param.grad is not None else torch.zeros_like(ref)
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()
        if err > worst:
            worst, worst_name = err, name
    return VerifyReport(preset, batch, micro_batch_size, loss, block_size, worst, worst_name or "-",
                        len(expected), result.loss, time.perf_counter() - start)
