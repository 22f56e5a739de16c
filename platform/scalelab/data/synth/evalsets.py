"""Zero-shot evaluation sets of the synthetic world, written as ImageFolder trees.

Each set is `<out>/<set>/<class folder>/<00000>.png` plus `classnames.txt` (one readable name per class
folder, in sorted folder order) and `templates.txt` (prompt templates with `{c}`). The sets follow
BASIC's robustness suite in spirit:

    test         in-distribution scenes, labelled by object class
    test_colour  in-distribution scenes, labelled by colour
    v2           a fresh sample of the same distribution (ImageNet-V2's role)
    sketch       outline-only objects on plain backgrounds (ImageNet-Sketch's role)
    texture      backgrounds never seen in training (a texture shift, ImageNet-R-like)
    hard         distractor clutter, occlusion, unusual scale (ImageNet-A / ObjectNet-like)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from scalelab.data.synth.generate import encode_png, run_tasks
from scalelab.data.synth.render import HardVariant, render_scene
from scalelab.data.synth.world import CLASSES, COLOURS, EVAL_BACKGROUNDS, sample_scene, world_level

__all__ = ["CLASS_TEMPLATES", "COLOUR_TEMPLATES", "EVAL_SETS", "generate_eval_sets", "render_eval_image"]

# Streams 0 and 1 are training and retrieval (generate.py); eval sets take the next ones.
EVAL_SETS: dict[str, int] = {"test": 2, "test_colour": 3, "v2": 4, "sketch": 5, "texture": 6, "hard": 7}

CLASS_TEMPLATES = [
    "a photo of a {c}.", "a drawing of a {c}.", "a picture of a {c}.", "an image of a {c}.", "a {c}.",
    "a small {c}.", "a large {c}.", "a cartoon {c}.", "clipart of a {c}.", "an icon of a {c}.",
    "a sketch of a {c}.", "a rendering of a {c}.", "the {c}.", "a {c} on a background.",
]
COLOUR_TEMPLATES = [
    "a {c} object.", "a photo of a {c} object.", "a {c} shape.", "a drawing of something {c}.",
    "something {c}.", "a {c} thing.", "clipart of a {c} object.", "an icon in {c}.", "the colour {c}.",
    "a {c} icon.", "a small {c} object.", "a large {c} object.",
]


def _folders(name: str) -> tuple[list[str], list[str]]:
    """(folder names in sorted order, readable class names in the same order) of set `name`."""
    if name == "test_colour":
        keys = sorted(COLOURS)
        return keys, keys
    keys = sorted(CLASSES)
    return keys, [CLASSES[k][0] for k in keys]


def render_eval_image(name: str, label: str, seed: int, index: int, image_size: int,
                      level: str = "standard") -> Image.Image:
    """Image `index` of class folder `label` in eval set `name` of world `level` (a pure function of its
    arguments)."""
    rng = np.random.default_rng([seed, EVAL_SETS[name], sorted(_folders(name)[0]).index(label), index])
    background, hard = None, None
    if name == "test_colour":
        attrs = sample_scene(rng, level=level, colour=label)
    elif name == "sketch":
        attrs = sample_scene(rng, level=level, cls=label, style="outline", background="plain")
    else:
        attrs = sample_scene(rng, level=level, cls=label)
    if name == "texture":
        textures = sorted(EVAL_BACKGROUNDS)
        background = textures[int(rng.integers(len(textures)))]
    elif name == "hard":
        kind = int(rng.integers(3))
        hard = [HardVariant(clutter=int(rng.integers(2, 5))),
                HardVariant(occlude=float(rng.uniform(0.3, 0.45))),
                HardVariant(scale=float(rng.choice([0.55, 1.6])))][kind]
    return render_scene(attrs, image_size, rng, background=background, hard=hard)


def _write_folder(root: str, name: str, label: str, seed: int, image_size: int, per_class: int,
                  level: str) -> int:
    folder = Path(root) / name / label
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):  # a rerun with a smaller per_class must not keep old images
        stale.unlink()
    for j in range(per_class):
        image = render_eval_image(name, label, seed, j, image_size, level)
        (folder / f"{j:05d}.png").write_bytes(encode_png(image))
    return per_class


def generate_eval_sets(out_dir: str | Path, *, seed: int = 0, image_size: int = 32, per_class: int = 20,
                       sets: list[str] | None = None, workers: int = 1, progress: bool = False,
                       level: str = "standard") -> list[Path]:
    """Write the eval sets (default: all of EVAL_SETS) under out_dir; returns their directories."""
    sets = list(EVAL_SETS) if sets is None else sets
    world_level(level)
    unknown = [s for s in sets if s not in EVAL_SETS]
    if unknown or per_class <= 0:
        raise ValueError(f"unknown eval sets {unknown} (known: {list(EVAL_SETS)}) or per_class <= 0")
    root = Path(out_dir)
    tasks = []
    for name in sets:
        folders, readable = _folders(name)
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "classnames.txt").write_text("\n".join(readable) + "\n")
        templates = COLOUR_TEMPLATES if name == "test_colour" else CLASS_TEMPLATES
        (root / name / "templates.txt").write_text("\n".join(templates) + "\n")
        tasks += [(str(root), name, label, seed, image_size, per_class, level) for label in folders]
    run_tasks(_write_folder, tasks, [per_class] * len(tasks), workers=workers, progress=progress,
              desc="synth eval")
    return [root / name for name in sets]
