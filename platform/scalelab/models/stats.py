"""Parameter and MAC accounting for model specs, computed on the meta device (no weights allocated).

The model is built under `torch.device("meta")` and run once on meta inputs inside torch's
FlopCounterMode, so even basic-l (3 B parameters) is counted in seconds. On meta tensors
scaled_dot_product_attention decomposes into matmuls, so attention is counted too (the fused CPU
kernel on real tensors is invisible to the flop counter). Ops without a flop formula (norms,
activations, softmax, embedding lookups) are not counted: MACs here are the matmul/conv MACs.

The compute of one *training* sample is ≈ 3 × `macs_per_sample` (forward + backward ≈ 2 × forward);
the training code applies that factor (and the gradient cache's extra forward) itself.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scalelab.config import ModelSpec
from scalelab.models.presets import build_model, get_spec, list_presets

__all__ = ["ModelStats", "activation_bytes_per_sample", "count_params", "preset_stats", "preset_table"]


@dataclass(frozen=True)
class ModelStats:
    """Size and forward cost of one model spec (MACs for one image + one full-length caption)."""

    name: str
    image_params: int
    text_params: int
    params: int
    image_macs: int
    text_macs: int
    macs_per_sample: int
    image_size: int
    context_length: int
    embed_dim: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (works on meta tensors)."""
    return sum(p.numel() for p in module.parameters())


def _forward_macs(fn: Any, *inputs: torch.Tensor) -> int:
    """MACs of one call of `fn(*inputs)`: FlopCounterMode counts 2 flops per multiply-accumulate."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() // 2


def preset_stats(name_or_spec: str | ModelSpec) -> ModelStats:
    """Parameters and forward MACs per sample of a preset (by name) or of a spec, without weights."""
    spec = get_spec(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    return _stats(spec.model_dump_json())


# A sweep asks for the same few specs once per trial, and basic-l takes seconds: keyed by the spec's
# JSON (a spec holds dicts, so it is not hashable itself).
@functools.lru_cache(maxsize=64)
def _stats(spec_json: str) -> ModelStats:
    spec = ModelSpec.model_validate_json(spec_json)
    meta = torch.device("meta")
    with meta:
        model = build_model(spec).eval()
    images = torch.empty(1, 3, spec.image_size, spec.image_size, device=meta)
    # A caption that fills the context: the most expensive (and the usual, padded) text input.
    tokens = torch.ones(1, spec.context_length, dtype=torch.long, device=meta)
    image_macs = _forward_macs(model.encode_image, images)
    text_macs = _forward_macs(model.encode_text, tokens)
    return ModelStats(
        name=spec.name,
        image_params=count_params(model.image_tower),
        text_params=count_params(model.text_tower),
        params=count_params(model),
        image_macs=image_macs,
        text_macs=text_macs,
        macs_per_sample=image_macs + text_macs,
        image_size=spec.image_size,
        context_length=spec.context_length,
        embed_dim=spec.embed_dim,
    )


def preset_table() -> list[ModelStats]:
    """`preset_stats` of every registered preset, in registration order."""
    return [preset_stats(name) for name in list_presets()]


def activation_bytes_per_sample(name_or_spec: str | ModelSpec) -> float:
    """Bytes autograd saves for the backward pass per training sample (fp32), on the meta device.

    This is what one gradient-cache micro-batch costs in activation memory per sample (phase 3
    re-encodes a micro-batch with autograd): every tensor saved for backward is counted through
    `saved_tensors_hooks` during a forward of batch 2 and of batch 1; the difference removes what does
    not scale with the batch (weights saved by matmuls). An upper bound: on meta, attention is
    decomposed and its B×heads×L×L probabilities are counted, which fused kernels do not keep;
    activation checkpointing reduces it further (not modelled). Sweeps size micro-batches with it.
    """
    spec = get_spec(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    meta = torch.device("meta")
    with meta:
        model = build_model(spec).train()

    def saved(batch: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        images = torch.empty(batch, 3, spec.image_size, spec.image_size, device=meta)
        tokens = torch.ones(batch, spec.context_length, dtype=torch.long, device=meta)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.encode_image(images)
            model.encode_text(tokens)
        return total

    return float(saved(2) - saved(1))
