"""The synthetic world's definition: attribute families, their values, synonyms, and scene sampling.

Everything else in `scalelab.data.synth` (rendering, captions, generation, eval sets) reads these tables;
changing a table changes the world, so bump WORLD_VERSION whenever one changes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "COLOURS",
    "COUNTS",
    "EVAL_BACKGROUNDS",
    "LEVELS",
    "POSITIONS",
    "SIZES",
    "STYLES",
    "WORLD_VERSION",
    "SceneAttributes",
    "WorldLevel",
    "attribute_families",
    "class_names",
    "combination_count",
    "sample_scene",
    "world_config",
    "world_level",
]

WORLD_VERSION = "1"

# class key -> (readable name, [(singular, plural) synonyms used in captions]). The readable name is
# what `classnames.txt` holds and what zero-shot prompts are built from.
CLASSES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "arrow": ("arrow", [("arrow", "arrows"), ("pointer", "pointers"), ("arrow sign", "arrow signs")]),
    "bell": ("bell", [("bell", "bells"), ("church bell", "church bells"), ("jingle bell", "jingle bells")]),
    "boat": ("sailboat", [("sailboat", "sailboats"), ("boat", "boats"), ("sailing ship", "sailing ships")]),
    "bolt": ("lightning bolt", [("lightning bolt", "lightning bolts"), ("bolt", "bolts"),
                                ("thunderbolt", "thunderbolts")]),
    "car": ("car", [("car", "cars"), ("automobile", "automobiles"), ("toy car", "toy cars")]),
    "circle": ("circle", [("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")]),
    "cross": ("cross", [("cross", "crosses"), ("plus sign", "plus signs")]),
    "cup": ("cup", [("cup", "cups"), ("mug", "mugs"), ("coffee cup", "coffee cups")]),
    "diamond": ("diamond", [("diamond", "diamonds"), ("rhombus", "rhombuses"), ("lozenge", "lozenges")]),
    "fish": ("fish", [("fish", "fish"), ("goldfish", "goldfish")]),
    "flower": ("flower", [("flower", "flowers"), ("blossom", "blossoms"), ("daisy", "daisies")]),
    "heart": ("heart", [("heart", "hearts"), ("love heart", "love hearts"), ("heart shape", "heart shapes")]),
    "hexagon": ("hexagon", [("hexagon", "hexagons"), ("six-sided shape", "six-sided shapes")]),
    "house": ("house", [("house", "houses"), ("home", "homes"), ("cottage", "cottages")]),
    "key": ("key", [("key", "keys"), ("door key", "door keys")]),
    "moon": ("crescent moon", [("crescent moon", "crescent moons"), ("moon", "moons"),
                               ("crescent", "crescents")]),
    "mushroom": ("mushroom", [("mushroom", "mushrooms"), ("toadstool", "toadstools")]),
    "ring": ("ring", [("ring", "rings"), ("donut", "donuts"), ("hoop", "hoops")]),
    "square": ("square", [("square", "squares"), ("box", "boxes"), ("block", "blocks")]),
    "star": ("star", [("star", "stars"), ("five-pointed star", "five-pointed stars")]),
    "tree": ("tree", [("tree", "trees"), ("pine tree", "pine trees"), ("fir", "firs")]),
    "triangle": ("triangle", [("triangle", "triangles"), ("pyramid shape", "pyramid shapes")]),
    "umbrella": ("umbrella", [("umbrella", "umbrellas"), ("parasol", "parasols")]),
}

# colour -> (RGB, caption synonyms). Saturated or extreme hues: backgrounds are desaturated mid-tones,
# so the object's colour stays the most salient colour in the image.
COLOURS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "black": ((22, 22, 26), ["black", "dark"]),
    "blue": ((35, 75, 225), ["blue", "azure"]),
    "brown": ((125, 75, 35), ["brown", "chocolate"]),
    "green": ((35, 165, 55), ["green", "emerald"]),
    "orange": ((250, 135, 15), ["orange", "tangerine"]),
    "pink": ((250, 120, 195), ["pink", "rose"]),
    "purple": ((135, 50, 200), ["purple", "violet"]),
    "red": ((220, 30, 35), ["red", "crimson", "scarlet"]),
    "white": ((248, 248, 248), ["white", "snow-white"]),
    "yellow": ((245, 220, 25), ["yellow", "golden"]),
}

# size -> (object box as a fraction of the image side, caption synonyms)
SIZES: dict[str, tuple[float, list[str]]] = {
    "small": (0.36, ["small", "tiny", "little"]),
    "medium": (0.48, ["medium", "medium-sized", "mid-size"]),
    "large": (0.62, ["large", "big", "huge"]),
}

# position -> (anchor (x, y) as fractions of the image side, caption phrases)
POSITIONS: dict[str, tuple[tuple[float, float], list[str]]] = {
    "bottom": ((0.5, 0.7), ["at the bottom", "in the lower part", "near the bottom"]),
    "center": ((0.5, 0.5), ["in the center", "in the middle", "centered"]),
    "left": ((0.3, 0.5), ["on the left", "on the left side", "to the left"]),
    "right": ((0.7, 0.5), ["on the right", "on the right side", "to the right"]),
    "top": ((0.5, 0.3), ["at the top", "in the upper part", "near the top"]),
}

COUNTS: dict[int, list[str]] = {1: ["a", "one", "a single"], 2: ["two", "a pair of", "2"], 3: ["three", "3"]}

# background -> caption phrases. Training backgrounds; EVAL_BACKGROUNDS never appear in training
# (the `texture` shift set uses them).
BACKGROUNDS: dict[str, list[str]] = {
    "checker": ["on a checkered background", "on a checkerboard", "with a checker pattern"],
    "dots": ["on a polka dot background", "on dots", "with a dotted pattern"],
    "gradient": ["on a gradient background", "on a smooth gradient", "with a colour gradient"],
    "noise": ["on a noisy background", "on grainy noise", "with a speckled texture"],
    "plain": ["on a plain background", "on a blank background", "isolated"],
    "stripes": ["on a striped background", "on stripes", "with a striped pattern"],
}
EVAL_BACKGROUNDS: dict[str, list[str]] = {
    "blotches": ["on a marbled background"],
    "grid": ["on a grid background"],
    "rings": ["on a concentric rings background"],
    "waves": ["on a wavy background"],
}

STYLES: dict[str, list[str]] = {
    "filled": ["filled", "solid", "flat"],
    "outline": ["outline", "line-art", "outlined"],
}


@dataclass(frozen=True)
class WorldLevel:
    """How hard the world is: families pinned in every scene, and how much of a scene captions name.

    `standard` is the full world. `easy` is for demo-scale runs (a sub-million-parameter ViT, minutes on
    a CPU): one large, filled, centred object — a patch-8 ViT then needs no position/scale invariance
    (backgrounds still vary: with a plain one too, the 1000-pair point memorises and its smallest batch
    stays at chance) — and terse captions that mostly name only the
    object, so the contrastive loss can fall only by learning shapes. Accuracy then rises within a few
    hundred steps instead of staying at chance. The eval sets follow the level, except where a set pins
    a family itself (sketch: outline objects; texture: unseen backgrounds).
    """

    fixed: tuple[tuple[str, Any], ...] = ()
    caption_keep: tuple[tuple[str, float], ...] = ()  # overrides of captions.KEEP

    def spec(self) -> dict[str, Any]:
        """What a manifest records of the level, so a changed definition is told from the one on disk."""
        return {"fixed": dict(self.fixed), "caption_keep": dict(self.caption_keep)}


LEVELS: dict[str, WorldLevel] = {
    "standard": WorldLevel(),
    "easy": WorldLevel(
        fixed=(("position", "center"), ("size", "large"), ("count", 1), ("style", "filled")),
        caption_keep=tuple((family, 0.1) for family in
                           ("count", "colour", "size", "style", "position", "background")),
    ),
}


def world_level(name: str) -> WorldLevel:
    """The WorldLevel called `name` (ValueError naming the known levels otherwise)."""
    if name not in LEVELS:
        raise ValueError(f"unknown world level {name!r}; known: {', '.join(LEVELS)}")
    return LEVELS[name]


@dataclass(frozen=True)
class SceneAttributes:
    """The structured content of one scene: one value per attribute family."""

    cls: str
    colour: str
    size: str
    position: str
    count: int
    background: str
    style: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attribute_families() -> dict[str, list[Any]]:
    """Family name -> the values training scenes draw from (eval-only backgrounds excluded)."""
    return {
        "cls": sorted(CLASSES),
        "colour": sorted(COLOURS),
        "size": list(SIZES),
        "position": sorted(POSITIONS),
        "count": sorted(COUNTS),
        "background": sorted(BACKGROUNDS),
        "style": list(STYLES),
    }


def combination_count() -> int:
    """Distinct attribute combinations of the training distribution (product of family sizes)."""
    return math.prod(len(v) for v in attribute_families().values())


def class_names() -> list[str]:
    """Readable class names in sorted class-key order (the order of ImageFolder class folders)."""
    return [CLASSES[k][0] for k in sorted(CLASSES)]


def sample_scene(rng: np.random.Generator, *, level: str = "standard", **fixed: Any) -> SceneAttributes:
    """Draw a scene uniformly over every family; keyword arguments pin families (e.g. cls="star"), on top
    of the families `level` pins."""
    fixed = {**dict(world_level(level).fixed), **fixed}
    values: dict[str, Any] = {}
    for family, options in attribute_families().items():
        # Always draw, even when pinned, so pinning one family doesn't shift the others' random streams.
        drawn = options[int(rng.integers(len(options)))]
        values[family] = fixed.get(family, drawn)
    unknown = set(fixed) - set(values)
    if unknown:
        raise ValueError(f"unknown attribute families {sorted(unknown)}; known: {sorted(values)}")
    return SceneAttributes(**values)


def world_config() -> dict[str, Any]:
    """What a manifest's `extra` records about the world itself (independent of seed and size)."""
    return {
        "world_version": WORLD_VERSION,
        "classes": sorted(CLASSES),
        "class_names": class_names(),
        "colours": sorted(COLOURS),
        "families": {k: [str(v) for v in vals] for k, vals in attribute_families().items()},
        "combinations": combination_count(),
    }
