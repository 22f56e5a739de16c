"""Self-checks of the exactness claim on this machine: cached step == one full-batch backward.

Used by `scalelab check` (float64, CPU) and by benchmarks/gpu_check.sh (bf16 on CUDA). The reference
computes the embeddings micro-batch by micro-batch *inside one autograd graph* (so dropout draws the
same noise in the same order as the cache's first pass) and calls backward once on the full-batch loss;
the cached step must reproduce every parameter gradient, the temperature's included.

- `verify_cached_step`: float64, dropout on; exact to 1e-9.
- `low_precision_check`: in bf16 exactness cannot be the claim. The cached step and one plain full-batch
  backward of the same bf16 model are both compared with a float64 reference of that model (its bf16
  weights upcast, so the same function in exact arithmetic); the cached step must be within
  `LOW_PRECISION_FACTOR` of the plain step's own error (module constants say why).
- `replay_check`: with dropout on, the replayed forward of every micro-batch equals its cached forward
  bit for bit (on CUDA: the CUDA generator's state, which flash-attention dropout also draws from), and
  the step leaves the RNG where one forward of the batch would.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from scalelab.config import ModelSpec
from scalelab.gradcache import cached_step, micro_batch_slices
from scalelab.losses import contrastive_loss, sigmoid_loss
from scalelab.models import DualEncoder, create_model

__all__ = ["DROPOUT", "CheckSetup", "LowPrecisionReport", "ReplayReport", "VerifyReport",
           "low_precision_check", "random_batch", "reference_gradients", "replay_check", "verify_cached_step"]

# Dropout and stochastic depth in both towers: the noise the RNG replay must reproduce.
DROPOUT = {"image": {"dropout": 0.1, "drop_path": 0.1}, "text": {"dropout": 0.1}}
# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), so a bf16 gradient is off by some
# 1e-3..1e-2 relative whatever computes it; an absolute tolerance at that level would also pass a
# cache that dropped a micro-batch of a large batch. The meaningful bound is relative to what bf16
# itself achieves on the same model and inputs: the cached step (the same arithmetic in a different
# order: micro-batch shapes, a surrogate backward, gradients summed over micro-batches) may be off by
# at most twice the plain full-batch step's error. A dropped or doubled micro-batch, a wrong temperature
# gradient or a broken replay gives errors of order 1/micro-batches, far above that.
LOW_PRECISION_FACTOR = 2.0
# ... and the plain step itself must be a bf16-sized error, or the reference is broken.
LOW_PRECISION_CEILING = 0.05


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
    """Gradients of one backward of the full-batch loss (forward chunked as the cache chunks it).

    The loss is computed in at least float32, from embeddings upcast as the cached step's loss phase
    upcasts them (a bf16 model's plain step thus differs from the cached one only in the caching)."""
    model.zero_grad(set_to_none=True)
    slices = micro_batch_slices(images.shape[0], micro)
    img = torch.cat([model.encode_image(images[s]) for s in slices])
    txt = torch.cat([model.encode_text(tokens[s]) for s in slices])
    dtype = torch.promote_types(img.dtype, torch.float32)
    img, txt = img.to(dtype), txt.to(dtype)
    scale = model.logit_scale.to(dtype).exp()
    if loss == "softmax":
        value = contrastive_loss(img, txt, scale)
    else:
        value = sigmoid_loss(img, txt, scale, model.logit_bias.to(dtype))
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
    model = create_model(preset, **DROPOUT, logit_bias=loss == "sigmoid").double().train()
    images, tokens = random_batch(model.config, batch, seed=seed)

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


def random_batch(spec: ModelSpec, batch: int, *, seed: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian images and random captions of random lengths (padded with 0), drawn on the CPU from a
    generator seeded with `seed` (the same batch on every device and dtype), then moved."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, spec.vocab_size, (batch, spec.context_length), generator=g)
    lengths = torch.randint(1, spec.context_length + 1, (batch,), generator=g)
    tokens[torch.arange(spec.context_length)[None, :] >= lengths[:, None]] = 0
    return images.to(device, dtype), tokens.to(device)


@dataclass(frozen=True)
class CheckSetup:
    """What a low-precision check ran on."""

    preset: str
    batch: int
    micro_batch_size: int
    dtype: str
    device: str

    def __str__(self) -> str:
        return f"{self.dtype}, {self.device}, B={self.batch}, micro {self.micro_batch_size}"


def _setup(preset: str, batch: int, micro_batch_size: int, device: torch.device | str, dtype: torch.dtype,
           seed: int, **overrides: object) -> tuple[DualEncoder, torch.Tensor, torch.Tensor, CheckSetup]:
    """A seeded model in `dtype` on `device`, in train mode, and a random batch for it."""
    torch.manual_seed(seed)
    model = create_model(preset, **overrides).to(device, dtype).train()
    images, tokens = random_batch(model.config, batch, seed=seed + 1, device=device, dtype=dtype)
    setup = CheckSetup(preset, batch, micro_batch_size, str(dtype).removeprefix("torch."), images.device.type)
    return model, images, tokens, setup


# --------------------------------------------------------------------------- low precision (bf16)
@dataclass(frozen=True)
class LowPrecisionReport:
    """Relative L2 errors of the flattened gradient (all parameters) against a float64 reference."""

    setup: CheckSetup
    cached_err: float  # the cached step's
    plain_err: float  # one plain full-batch backward's, same model, inputs and dtype
    factor: float = LOW_PRECISION_FACTOR
    ceiling: float = LOW_PRECISION_CEILING

    @property
    def ok(self) -> bool:
        return self.plain_err <= self.ceiling and self.cached_err <= self.factor * self.plain_err

    def summary(self) -> str:
        return (f"cached step vs full-batch step ({self.setup}): relative gradient error vs float64 "
                f"{self.cached_err:.3g}, the plain {self.setup.dtype} step's {self.plain_err:.3g}; ratio "
                f"{self.cached_err / self.plain_err:.2f} (tolerance: <= {self.factor:g}, plain error <= "
                f"{self.ceiling:g})")


def low_precision_check(preset: str = "tiny", batch: int = 64, micro_batch_size: int = 16, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        seed: int = 0) -> LowPrecisionReport:
    """The cached step and a plain full-batch step, both in `dtype` on `device`, against float64."""
    # no dropout: the plain step is one forward of B rows
    model, images, tokens, setup = _setup(preset, batch, micro_batch_size, device, dtype, seed)
    exact = copy.deepcopy(model).double()  # the same (rounded) weights, evaluated exactly
    want = _flat(reference_gradients(exact, images.double(), tokens, batch, "softmax"))
    plain = _flat(reference_gradients(model, images, tokens, batch, "softmax"))
    model.zero_grad(set_to_none=True)
    cached_step(model, images, tokens, micro_batch_size=micro_batch_size)
    cached = _flat({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return LowPrecisionReport(setup, _rel_err(cached, want), _rel_err(plain, want))


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[name].double().flatten() for name in sorted(grads)])


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:  # a parameter without a gradient on one side
        return float("inf")
    return ((got - want).norm() / want.norm()).item()


# --------------------------------------------------------------------------- RNG replay
@dataclass(frozen=True)
class ReplayReport:
    """What the RNG replay of a cached step with dropout did."""

    setup: CheckSetup
    dropout_draws: bool  # two forwards of one micro-batch differ: there is noise to replay
    replay_max_abs_diff: float  # largest |re-forward - cached forward| over all micro-batches
    rng_as_one_forward: bool  # the step left every generator where one forward of the batch does

    @property
    def ok(self) -> bool:
        return self.dropout_draws and self.replay_max_abs_diff == 0.0 and self.rng_as_one_forward

    def summary(self) -> str:
        diff = self.replay_max_abs_diff
        return (f"RNG replay with dropout ({self.setup}): max |replayed - cached| = {diff:.3g} (tolerance: "
                f"0, bit for bit); dropout draws noise: {self.dropout_draws}; RNG left as after one forward: "
                f"{self.rng_as_one_forward}")


def replay_check(preset: str = "tiny", batch: int = 32, micro_batch_size: int = 8, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> ReplayReport:
    """One cached step of a model with dropout in both towers; see `ReplayReport`."""
    model, images, tokens, setup = _setup(preset, batch, micro_batch_size, device, dtype, seed, **DROPOUT)
    first = slice(0, micro_batch_size)
    with torch.no_grad():
        draws = not torch.equal(model.encode_image(images[first]), model.encode_image(images[first]))
        draws = draws and not torch.equal(model.encode_text(tokens[first]), model.encode_text(tokens[first]))
        start = _rng_states(images.device)
        for encode, rows in ((model.encode_image, images), (model.encode_text, tokens)):
            for sl in micro_batch_slices(batch, micro_batch_size):
                encode(rows[sl])  # the cache's first pass draws in this order
    after_one_forward = _rng_states(images.device)
    _set_rng_states(start, images.device)
    result = cached_step(model, images, tokens, micro_batch_size=micro_batch_size)
    same = all(torch.equal(a, b) for a, b in zip(_rng_states(images.device), after_one_forward))
    return ReplayReport(setup, draws, result.replay_max_abs_diff, same)


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def _set_rng_states(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)
