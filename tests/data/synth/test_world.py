"""The world definition is rich enough, and every class renders legibly and distinctly at 32 px."""

import itertools

import numpy as np
import pytest

from scalelab.data.synth import (
    SceneAttributes,
    attribute_families,
    class_names,
    combination_count,
    render_scene,
    sample_scene,
)
from scalelab.data.synth.render import HardVariant
from scalelab.data.synth.world import CLASSES, COLOURS, EVAL_BACKGROUNDS


def test_world_has_enough_families_and_combinations():
    families = attribute_families()
    assert len(families) >= 6
    assert len(families["cls"]) >= 20 and len(families["colour"]) >= 8
    assert set(families["size"]) == {"small", "medium", "large"}
    assert set(families["position"]) == {"left", "right", "top", "bottom", "center"}
    assert families["count"] == [1, 2, 3]
    assert {"plain", "stripes", "dots", "gradient", "noise", "checker"} <= set(families["background"])
    assert not set(EVAL_BACKGROUNDS) & set(families["background"])  # texture shift is unseen in training
    assert combination_count() == np.prod([len(v) for v in families.values()]) >= 10_000
    assert len(class_names()) == len(set(class_names())) == len(CLASSES)


def test_sample_scene_covers_families_and_pins():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(600)]
    for family, values in attribute_families().items():
        assert {getattr(s, family) for s in scenes} == set(values), family
    pinned = sample_scene(np.random.default_rng(1), cls="star", style="outline")
    assert (pinned.cls, pinned.style) == ("star", "outline")
    with pytest.raises(ValueError):
        sample_scene(rng, shape="star")


def _canonical(cls: str, style: str = "filled") -> np.ndarray:
    attrs = SceneAttributes(cls, "blue", "large", "center", 1, "plain", style)
    # same rng seed for every class: identical background, jitter and shade; only the shape differs
    return np.asarray(render_scene(attrs, 32, np.random.default_rng(7)), dtype=np.float64)


@pytest.mark.parametrize("style", ["filled", "outline"])
def test_every_class_renders_visibly_and_distinctly_at_32px(style):
    images = {cls: _canonical(cls, style) for cls in sorted(CLASSES)}
    background = images["circle"][0, 0]
    for cls, img in images.items():
        assert img.shape == (32, 32, 3)
        covered = (np.abs(img - background).sum(-1) > 60).mean()
        assert covered > 0.04, f"{cls} ({style}) covers only {covered:.3f} of the image"
    diffs = {
        (a, b): np.abs(images[a] - images[b]).mean() for a, b in itertools.combinations(sorted(images), 2)
    }
    worst = min(diffs, key=diffs.get)
    # >= 2 grey levels per pixel on average, i.e. dozens of clearly different pixels for the closest pair
    assert diffs[worst] > 2.0, f"{worst} nearly identical: {diffs[worst]:.2f}"
    assert np.mean(list(diffs.values())) > 8.0


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_sizes_and_determinism(size):
    attrs = sample_scene(np.random.default_rng(3))
    a = render_scene(attrs, size, np.random.default_rng(5))
    b = render_scene(attrs, size, np.random.default_rng(5))
    assert a.size == (size, size) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_every_background_colour_and_hard_variant_renders():
    rng = np.random.default_rng(0)
    for bg in [*attribute_families()["background"], *EVAL_BACKGROUNDS]:
        for colour in COLOURS:
            attrs = sample_scene(rng, colour=colour)
            img = np.asarray(render_scene(attrs, 32, rng, background=bg))
            assert img.std() > 0
    attrs = sample_scene(rng, cls="key")
    for variant in (HardVariant(clutter=3), HardVariant(occlude=0.4), HardVariant(scale=1.6)):
        plain = np.asarray(render_scene(attrs, 32, np.random.default_rng(1)), dtype=float)
        hard = np.asarray(render_scene(attrs, 32, np.random.default_rng(1), hard=variant), dtype=float)
        assert np.abs(plain - hard).mean() > 0.5, variant
    with pytest.raises(ValueError):
        render_scene(SceneAttributes("dragon", "red", "small", "left", 1, "plain", "filled"))
