"""Named model presets (the model axis of a scaling sweep) and the factory functions.

A preset is a function returning a ModelSpec, registered with `@register_preset(name)`. Every preset
builds with pretrained=False: scalelab trains from scratch and never downloads weights.

Counts below are from `scalelab.models.preset_stats` (meta device; MACs = one image at the preset's
size + one full-length caption, forward only; training ≈ 3× that).

| preset    | image tower (timm)                 | text w×d/heads, vocab, ctx | params  | GMACs/sample |
|-----------|------------------------------------|----------------------------|---------|--------------|
| nano      | ViT 32 px, patch 8, 16×1, 1 head   | 16×1/1, 4096, 32           | 0.08 M  | 0.00024      |
| micro     | ViT 32 px, patch 8, 32×2, 2 heads  | 32×2/2, 4096, 32           | 0.19 M  | 0.0015       |
| tiny      | ViT 32 px, patch 8, 80×4, 4 heads  | 64×4/4, 4096, 32           | 0.80 M  | 0.0125       |
| small     | ViT 64 px, patch 8, 160×6, 4 heads | 128×6/4, 4096, 32          | 3.65 M  | 0.169        |
| coat-tiny | slimmed coatnet_pico_rw, 64 px     | 64×4/4, 4096, 32           | 1.54 M  | 0.0277       |
| vit-b16   | vit_base_patch16_224, 224 px       | 512×12/8, 49408, 77        | 149.6 M | 20.5         |
| basic-s   | coatnet_0_224 (24.9 M), 224 px     | 1024×6/16, 32000, 64       | 134.1 M | 9.43         |
| basic-m   | coatnet_3_224 (167 M), 224 px      | 1024×12/16, 32000, 64      | 352.0 M | 46.2         |
| basic-l   | CoAtNet-7-like (2.357 B), 224 px   | 2048×12/16, 32000, 64      | 3.03 B  | 486          |

(`scalelab models` prints the exact, current table.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from scalelab.config import (
    ConfigError,
    ExperimentConfig,
    ImageTowerConfig,
    ModelSpec,
    TextTowerConfig,
    deep_merge,
    validate,
)
from scalelab.models.classifier import ImageClassifier
from scalelab.models.dual import DualEncoder

__all__ = ["build_model", "create_classifier", "create_model", "get_spec", "list_presets", "model_for",
           "register_preset"]

PresetFn = Callable[[], ModelSpec]

# Filled only by @register_preset at import time; read-only afterwards.
_PRESETS: dict[str, PresetFn] = {}


def register_preset(name: str) -> Callable[[PresetFn], PresetFn]:
    """Decorator registering a zero-argument function that returns a ModelSpec under `name`."""

    def decorator(fn: PresetFn) -> PresetFn:
        if name in _PRESETS:
            raise ValueError(f"model preset {name!r} is already registered")
        _PRESETS[name] = fn
        return fn

    return decorator


def list_presets() -> list[str]:
    """Registered preset names, in registration order (smallest first)."""
    return list(_PRESETS)


def get_spec(preset: str, **overrides: Any) -> ModelSpec:
    """The preset's ModelSpec with `overrides` (partial ModelSpec fields) deep-merged and re-validated.

    One exception to the deep merge: an override that changes `image.timm_name` starts from empty
    `image.timm_kwargs` (the preset's kwargs, e.g. a ViT's patch_size, belong to the old backbone and
    would be rejected by the new one); give `image.timm_kwargs` in the same override to set new ones.
    """
    if preset not in _PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; allowed: {', '.join(_PRESETS)}")
    spec = _PRESETS[preset]()
    if not overrides:
        return spec
    # model_dump() (python mode) keeps tuples in timm_kwargs; mappings merge key by key.
    base = spec.model_dump()
    image = overrides.get("image")
    if isinstance(image, dict) and image.get("timm_name", spec.image.timm_name) != spec.image.timm_name:
        base["image"]["timm_kwargs"] = {}
    return validate(ModelSpec, deep_merge(base, overrides), prefix="model.overrides.")


def build_model(spec: ModelSpec) -> DualEncoder:
    """Instantiate the dual encoder described by `spec` (on the current default device)."""
    return DualEncoder(spec)


def create_model(preset: str, **overrides: Any) -> DualEncoder:
    """`build_model(get_spec(preset, **overrides))`, e.g. create_model('tiny', text={'dropout': 0.1})."""
    return build_model(get_spec(preset, **overrides))


def create_classifier(preset: str, num_classes: int, *, head: str = "softmax",
                      **overrides: Any) -> ImageClassifier:
    """The preset's image tower (same spec, same module names as in its DualEncoder) + a linear head."""
    return ImageClassifier(get_spec(preset, **overrides), num_classes, head=head)


def model_for(cfg: ExperimentConfig) -> nn.Module:
    """The model an experiment trains: its preset's DualEncoder, or for `task: classify` the preset's
    ImageClassifier over `data.labels.num_classes` (which must be resolved: launch.preflight does it)."""
    if cfg.task != "classify":
        return create_model(cfg.model.preset, **cfg.model.overrides)
    labels = cfg.data.labels
    if labels is None or labels.num_classes is None:
        raise ConfigError("task classify needs data.labels.num_classes (set it, or let preflight read it "
                          "from the data's manifest)")
    return create_classifier(cfg.model.preset, labels.num_classes, head=cfg.classify.head,
                             **cfg.model.overrides)


# --------------------------------------------------------------------------- helpers
def _vit(image_size: int, patch: int, width: int, depth: int, heads: int, **extra: Any) -> ImageTowerConfig:
    """A small timm ViT: vit_tiny_patch16_224's code with its sizes overridden."""
    kwargs = dict(patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, **extra)
    return ImageTowerConfig(timm_name="vit_tiny_patch16_224", timm_kwargs=kwargs, image_size=image_size)


def _text(width: int, depth: int, heads: int, vocab: int = 4096, context: int = 32) -> TextTowerConfig:
    """Default CPU text tower: the tokenizer trains 4096-token vocabularies; captions cut at 32."""
    return TextTowerConfig(vocab_size=vocab, context_length=context, width=width, depth=depth, heads=heads)


# --------------------------------------------------------------------------- CPU presets
@register_preset("pico")
def pico() -> ModelSpec:
    """~0.04 M params (half of nano's width): the demo's smallest model, near the floor of what learns."""
    return ModelSpec(name="pico", image=_vit(32, 8, 8, 1, 1), text=_text(8, 1, 1), embed_dim=8)


@register_preset("nano")
def nano() -> ModelSpec:
    """~0.05 M params: the low end of the demo's model axis (seconds per hundred steps on one core)."""
    return ModelSpec(name="nano", image=_vit(32, 8, 16, 1, 1), text=_text(16, 1, 1), embed_dim=16)


@register_preset("micro")
def micro() -> ModelSpec:
    """~0.2 M params: small enough to push a 262144-sample contrastive batch through on a CPU."""
    return ModelSpec(name="micro", image=_vit(32, 8, 32, 2, 2), text=_text(32, 2, 2), embed_dim=32)


@register_preset("tiny")
def tiny() -> ModelSpec:
    """~0.8 M params (~4.2× micro), 32 px: the default for quick runs and tests."""
    return ModelSpec(name="tiny", image=_vit(32, 8, 80, 4, 4), text=_text(64, 4, 4), embed_dim=64)


@register_preset("small")
def small() -> ModelSpec:
    """~3.7 M params (~4.6× tiny), 64 px: still trains in seconds to minutes on a laptop."""
    return ModelSpec(name="small", image=_vit(64, 8, 160, 6, 4), text=_text(128, 6, 4), embed_dim=128)


@register_preset("coat-tiny")
def coat_tiny() -> ModelSpec:
    """BASIC's tower family on a laptop: a slimmed CoAtNet (C-C-T-T, timm coatnet_pico_rw code) at 64 px.

    BatchNorm stays by default like in the paper; use image.norm='group' for exact gradient caching.
    """
    image = ImageTowerConfig(
        timm_name="coatnet_pico_rw_224",
        timm_kwargs=dict(embed_dim=(32, 64, 128, 256), depths=(1, 1, 2, 1), stem_width=(16, 32)),
        image_size=64,
    )
    return ModelSpec(name="coat-tiny", image=image, text=_text(64, 4, 4), embed_dim=64)


# --------------------------------------------------------------------------- paper-scale presets
@register_preset("vit-b16")
def vit_b16() -> ModelSpec:
    """CLIP ViT-B/16: ViT-B/16 at 224 px; text 12×512, 8 heads, vocab 49408, 77 tokens; embed 512.

    Differs from CLIP's text tower in pooling (masked mean instead of the EOS token, no causal mask).
    """
    image = ImageTowerConfig(timm_name="vit_base_patch16_224", image_size=224)
    text = TextTowerConfig(vocab_size=49408, context_length=77, width=512, depth=12, heads=8)
    return ModelSpec(name="vit-b16", image=image, text=text, embed_dim=512)


def _basic_text(width: int, depth: int, heads: int) -> TextTowerConfig:
    """BASIC's text towers: SentencePiece vocabulary of 32k, captions of 64 tokens."""
    return TextTowerConfig(vocab_size=32000, context_length=64, width=width, depth=depth, heads=heads)


@register_preset("basic-s")
def basic_s() -> ModelSpec:
    """BASIC-S: CoAtNet-0 image tower (timm coatnet_0_224, ~24 M) + 6-layer 1024-wide text tower."""
    image = ImageTowerConfig(timm_name="coatnet_0_224", image_size=224)
    return ModelSpec(name="basic-s", image=image, text=_basic_text(1024, 6, 16), embed_dim=768)


@register_preset("basic-m")
def basic_m() -> ModelSpec:
    """BASIC-M: CoAtNet-3 image tower (timm coatnet_3_224, ~165 M) + 12-layer 1024-wide text tower."""
    image = ImageTowerConfig(timm_name="coatnet_3_224", image_size=224)
    return ModelSpec(name="basic-m", image=image, text=_basic_text(1024, 12, 16), embed_dim=1024)


# CoAtNet-7 (Dai et al. 2021, 2.44 B): stem 192, MBConv 2×256 (1/4), 4×512 (1/8), 8×1024 (1/16), then
# 42 Transformer blocks at width 2048 at the same 1/16 resolution, and 2×3072 at 1/32. timm's MaxxViT
# gives each stride-2 stage one width, so we keep the C-C-T-T layout of the other CoAtNets, drop the
# 8 MBConv blocks at 1024 and keep the rest: stem 192, stages (256, 512, 2048, 3072) × (2, 4, 42, 2),
# pre-logits head 3072 (timm's coatnet_5_224 code with these model_args). Result: 2.355 B backbone
# parameters (2.357 B with the projection to 1024), 447 GMACs at 224 px (meta-device count).
COATNET7_LIKE_KWARGS: dict[str, Any] = dict(
    embed_dim=(256, 512, 2048, 3072), depths=(2, 4, 42, 2), stem_width=192, head_hidden_size=3072
)


@register_preset("basic-l")
def basic_l() -> ModelSpec:
    """BASIC-L: CoAtNet-7-like image tower (~2.35 B) + 12-layer 2048-wide text tower (~0.67 B)."""
    image = ImageTowerConfig(
        timm_name="coatnet_5_224", timm_kwargs=dict(COATNET7_LIKE_KWARGS), image_size=224
    )
    return ModelSpec(name="basic-l", image=image, text=_basic_text(2048, 12, 16), embed_dim=1024)
