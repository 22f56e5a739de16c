"""Web-alt-text-like captions for synthetic scenes: synonyms, shuffled templates, dropped attributes,
distractor words, and a fraction of mismatched pairs (the caption of another scene).

Matched captions always name the object class (a synonym of it), since that is what the zero-shot
evaluation asks for; every other attribute may be dropped, as real alt-text drops most of what an
image shows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scalelab.data.synth.world import (
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    COUNTS,
    EVAL_BACKGROUNDS,
    POSITIONS,
    SIZES,
    STYLES,
    SceneAttributes,
    sample_scene,
    world_level,
)

__all__ = ["DISTRACTOR_PREFIXES", "DISTRACTOR_SUFFIXES", "caption_for", "caption_pair", "class_synonyms"]

DISTRACTOR_PREFIXES = [
    "photo of", "stock image:", "image of", "picture of", "clipart:", "vector illustration of",
    "free download:", "icon -", "cute", "cartoon", "simple", "new",
]
DISTRACTOR_SUFFIXES = [
    "HD", "free download", "stock photo", "4k wallpaper", "png", "royalty free", "| stock image",
    "#art #design", "jpg", "high quality", "vector", "clip art", "for sale", "- illustration",
]
# Short background words for tag-list captions ("star, red, stripes").
BACKGROUND_TAGS = {"checker": "checkered", "dots": "polka dots", "gradient": "gradient", "noise": "grainy",
                   "plain": "plain", "stripes": "striped"}
POSITION_TAGS = {"bottom": "bottom", "center": "center", "left": "left", "right": "right", "top": "top"}

# Probability that each attribute survives into a caption (alt-text mentions what stands out).
KEEP = {"count": 0.7, "colour": 0.8, "size": 0.5, "style": 0.35, "position": 0.5, "background": 0.4}


def class_synonyms(cls: str) -> list[str]:
    """Every word form (singular and plural synonyms) a caption may use for class `cls`."""
    return sorted({form for pair in CLASSES[cls][1] for form in pair})


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _background_tag(background: str) -> str:
    return BACKGROUND_TAGS.get(background, background)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _noun_phrase(attrs: SceneAttributes, rng: np.random.Generator, keep: dict[str, bool]) -> str:
    singular, plural = CLASSES[attrs.cls][1][int(rng.integers(len(CLASSES[attrs.cls][1])))]
    adjectives = []
    if keep["size"]:
        adjectives.append(_pick(rng, SIZES[attrs.size][1]))
    if keep["colour"]:
        adjectives.append(_pick(rng, COLOURS[attrs.colour][1]))
    if keep["style"]:
        adjectives.append(_pick(rng, STYLES[attrs.style]))
    if rng.random() < 0.2:  # occasional non-canonical adjective order, as in scraped text
        rng.shuffle(adjectives)
    words = [*adjectives, plural if attrs.count > 1 else singular]
    if attrs.count > 1:
        return " ".join([_pick(rng, COUNTS[attrs.count]), *words] if keep["count"] else words)
    det = _pick(rng, COUNTS[1]) if keep["count"] else ""
    if det == "a":
        det = _article(words[0])
    return " ".join([det, *words] if det else words)


def _tag_caption(attrs: SceneAttributes, rng: np.random.Generator, keep: dict[str, bool]) -> str:
    singular, plural = CLASSES[attrs.cls][1][int(rng.integers(len(CLASSES[attrs.cls][1])))]
    tags = [plural if attrs.count > 1 else singular]
    optional = [
        ("colour", COLOURS[attrs.colour][1][0]), ("size", SIZES[attrs.size][1][0]),
        ("style", STYLES[attrs.style][0]), ("position", POSITION_TAGS[attrs.position]),
        ("background", _background_tag(attrs.background)),
    ]
    tags += [word for family, word in optional if keep[family]]
    rng.shuffle(tags)
    return ", ".join(tags)


def caption_for(attrs: SceneAttributes, rng: np.random.Generator, *, level: str = "standard") -> str:
    """One alt-text style caption of `attrs` (always naming the class), as verbose as `level` says."""
    probs = {**KEEP, **dict(world_level(level).caption_keep)}
    keep = {family: bool(rng.random() < probs[family]) for family in KEEP}
    template = int(rng.integers(6))
    if template == 5:
        body = _tag_caption(attrs, rng, keep)
    else:
        np_ = _noun_phrase(attrs, rng, keep)
        pos = _pick(rng, POSITIONS[attrs.position][1]) if keep["position"] else ""
        bg = _pick(rng, {**BACKGROUNDS, **EVAL_BACKGROUNDS}[attrs.background]) if keep["background"] else ""
        bg_lead = f"{_background_tag(attrs.background)} background with" if keep["background"] else ""
        parts = {
            0: [np_, pos, bg],
            1: [np_, bg, pos],
            2: [pos + "," if pos else "", np_, bg],
            3: [np_],
            4: [bg_lead, np_, pos],
        }[template]
        body = " ".join(p for p in parts if p)
    if rng.random() < 0.35:
        body = f"{_pick(rng, DISTRACTOR_PREFIXES)} {body}"
    if rng.random() < 0.35:
        body = f"{body} {_pick(rng, DISTRACTOR_SUFFIXES)}"
    return body[:1].upper() + body[1:] if rng.random() < 0.5 else body


def caption_pair(attrs: SceneAttributes, rng: np.random.Generator, mismatch: float, *,
                 level: str = "standard") -> tuple[str, dict[str, Any]]:
    """Caption for an image of `attrs`; with probability `mismatch` it describes another scene instead
    (a different class). Returns (caption, meta) with meta = {"attrs", "matched"[, "caption_attrs"]}."""
    meta: dict[str, Any] = {"attrs": attrs.to_dict(), "matched": True}
    if rng.random() < mismatch:
        other = sample_scene(rng, level=level)
        while other.cls == attrs.cls:
            other = sample_scene(rng, level=level)
        meta["matched"] = False
        meta["caption_attrs"] = other.to_dict()
        return caption_for(other, rng, level=level), meta
    return caption_for(attrs, rng, level=level), meta
