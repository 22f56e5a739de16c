"""The embedded synthetic image-text world: the default dataset of the demo, tests and laptop sweeps.

Procedural scenes (23 object classes x colour x size x position x count x background x style) with
alt-text-like captions, written as shard datasets, plus ImageFolder zero-shot eval sets with shifts.
"""

from scalelab.data.synth.build import generate_world
from scalelab.data.synth.captions import caption_for, caption_pair, class_synonyms
from scalelab.data.synth.evalsets import EVAL_SETS, generate_eval_sets, render_eval_image
from scalelab.data.synth.generate import generate_pairs, make_pair
from scalelab.data.synth.labelled import LABELLED_STREAM, generate_labelled, label_spaces, make_labelled
from scalelab.data.synth.render import HardVariant, render_scene
from scalelab.data.synth.world import (
    LEVELS,
    WORLD_VERSION,
    SceneAttributes,
    WorldLevel,
    attribute_families,
    class_names,
    combination_count,
    sample_scene,
    world_config,
    world_level,
)

__all__ = [
    "EVAL_SETS",
    "LABELLED_STREAM",
    "LEVELS",
    "WORLD_VERSION",
    "HardVariant",
    "SceneAttributes",
    "WorldLevel",
    "attribute_families",
    "caption_for",
    "caption_pair",
    "class_names",
    "class_synonyms",
    "combination_count",
    "generate_eval_sets",
    "generate_labelled",
    "generate_pairs",
    "generate_world",
    "label_spaces",
    "make_labelled",
    "make_pair",
    "render_eval_image",
    "render_scene",
    "sample_scene",
    "world_config",
    "world_level",
]
