"""Presets and accounting: names, growth, meta vs real counts, MACs vs a naive count, config errors."""

import itertools

import pytest
import torch

from scalelab.config import ConfigError, ModelSpec
from scalelab.models import (
    count_params,
    create_model,
    get_spec,
    list_presets,
    preset_stats,
    preset_table,
    register_preset,
)

REQUIRED = ["micro", "tiny", "small", "vit-b16", "basic-s", "basic-m", "basic-l"]


@pytest.fixture(scope="module")
def table():
    return {s.name: s for s in preset_table()}


def test_required_presets_are_listed(table):
    assert set(REQUIRED) <= set(list_presets())
    assert list(table) == list_presets()


def test_cpu_presets_grow_about_four_times(table):
    sizes = [table[name].params for name in ("micro", "tiny", "small")]
    assert sizes[0] < 500_000
    for smaller, larger in itertools.pairwise(sizes):
        assert 2.5 <= larger / smaller <= 6


@pytest.mark.parametrize("name", ["micro", "tiny", "small"])
def test_meta_counts_equal_real_counts(table, name):
    torch.manual_seed(0)
    model = create_model(name)
    stats = table[name]
    assert stats.params == count_params(model)
    assert stats.image_params == count_params(model.image_tower)
    assert stats.text_params == count_params(model.text_tower)
    assert stats.params == stats.image_params + stats.text_params + 1  # + logit_scale


def test_paper_scale_presets(table):
    basic_l = table["basic-l"]
    assert 2.2e9 <= basic_l.image_params <= 2.6e9
    assert 0.4e9 <= basic_l.text_params <= 0.8e9
    assert 20e6 <= table["basic-s"].image_params <= 30e6  # CoAtNet-0 (paper: 25 M)
    assert 150e6 <= table["basic-m"].image_params <= 180e6  # CoAtNet-3 (paper: 168 M)
    assert 80e6 <= table["vit-b16"].image_params <= 90e6  # ViT-B/16 (86 M)
    assert table["basic-l"].params > table["basic-m"].params > table["basic-s"].params
    for s in table.values():
        assert s.macs_per_sample == s.image_macs + s.text_macs > 0


def test_stats_fields(table):
    s = table["vit-b16"]
    assert (s.image_size, s.context_length, s.embed_dim) == (224, 77, 512)


def _naive_text_macs(spec: ModelSpec) -> int:
    """Linear layers + the two attention matmuls of every block, plus the projection of the mean."""
    t = spec.text
    length, width, hidden = t.context_length, t.width, int(t.width * t.mlp_ratio)
    per_block = (
        length * width * 3 * width  # qkv
        + 2 * length * length * width  # q·kᵀ and attn·v over all heads
        + length * width * width  # attention output projection
        + 2 * length * width * hidden  # MLP
    )
    return t.depth * per_block + width * spec.embed_dim


def _naive_vit_macs(spec: ModelSpec) -> int:
    """timm ViT with a class token: patch-embedding conv, blocks over N+1 tokens, projection."""
    kw, size = spec.image.timm_kwargs, spec.image_size
    patch, width, depth = kw["patch_size"], kw["embed_dim"], kw["depth"]
    patches = (size // patch) ** 2
    tokens = patches + 1
    per_block = 4 * tokens * width * width + 2 * tokens * tokens * width + 8 * tokens * width * width
    return patches * 3 * patch * patch * width + depth * per_block + width * spec.embed_dim


@pytest.mark.parametrize("name", ["micro", "small"])
def test_macs_agree_with_naive_count(table, name):
    spec = get_spec(name)
    assert table[name].text_macs == pytest.approx(_naive_text_macs(spec), rel=0.02)
    assert table[name].image_macs == pytest.approx(_naive_vit_macs(spec), rel=0.02)


def test_stats_of_a_custom_spec():
    spec = get_spec("small", text={"depth": 12})
    assert preset_stats(spec).text_macs == pytest.approx(_naive_text_macs(spec), rel=0.02)


def test_unknown_preset_lists_allowed_names():
    with pytest.raises(ConfigError) as err:
        get_spec("gigantic")
    message = str(err.value)
    assert "model.preset" in message and "gigantic" in message
    assert all(name in message for name in REQUIRED)
    with pytest.raises(ConfigError, match="gigantic"):
        create_model("gigantic")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"text": {"heads": 3}}, "text.heads"),
        ({"text": {"hedas": 4}}, "text.hedas"),
        ({"image": {"norm": "layer"}}, "image.norm"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_override_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        get_spec("tiny", **overrides)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_preset("micro")(lambda: get_spec("micro"))
