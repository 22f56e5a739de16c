"""Evaluation inputs: ImageFolder zero-shot sets and shard-dataset retrieval pairs, preprocessed for eval.

An ImageFolder set is `<dir>/<class folder>/<image>`, with an optional `classnames.txt` (one readable
class name per line, in sorted folder order; else the folder names) and `templates.txt` (prompt templates
with `{}` or `{c}`; else a shared templates file), as written by `scalelab.data.synth.generate_eval_sets`
— the rules of `scalelab.data.prompts`, which `scalelab data from-labels` follows too. Retrieval pairs
are a shard dataset (manifest.json + shards).

Preprocessing is CLIP's eval transform — shorter side to S, centre crop, bicubic, CLIP mean/std —
`scalelab.data.transforms.preprocess_eval`, the one function the training pipeline's decoder also uses
for eval rows (transforms.py imports no Ray, which `eval` must not: tests/test_imports.py).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scalelab.data import prompts
from scalelab.data.manifest import Manifest
from scalelab.data.prompts import (
    CLASSNAMES_FILE,
    TEMPLATES_FILE,
    class_folders,
    resolve_classnames,
    templates_file,
)
from scalelab.data.shards import TRUNCATED, BadSample, ShardError, iter_shard
from scalelab.data.transforms import CLIP_MEAN, CLIP_STD, preprocess_eval

__all__ = [
    "CLASSNAMES_FILE",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_SUFFIXES",
    "TEMPLATES_FILE",
    "LabelledImages",
    "load_image_folder",
    "load_pairs",
    "preprocess_eval",
    "read_classnames",
    "read_templates",
]

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = frozenset((".png", ".jpg", ".jpeg", ".webp", ".bmp"))


@dataclass(frozen=True)
class LabelledImages:
    """A loaded ImageFolder set: images float32 [N, 3, S, S], labels int64 [N] indexing `classnames`."""

    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def read_classnames(directory: str | Path) -> list[str]:
    """Readable class names of an ImageFolder set, one per class folder in sorted folder order
    (classnames.txt, else the folder names)."""
    return resolve_classnames(directory, class_folders(directory))


def read_templates(directory: str | Path, shared: str | Path | None = None) -> list[str]:
    """Prompt templates of an ImageFolder set (its templates.txt, else the `shared` file), each with
    one `{}` or `{c}` placeholder, normalised to `{c}`."""
    return prompts.read_templates(templates_file(directory, shared))


def load_image_folder(directory: str | Path, image_size: int,
                      templates: str | Path | None = None) -> LabelledImages:
    """Load every image of an ImageFolder set (layout in the module docstring), preprocessed for eval.

    `templates`: a shared templates file, used when the set has no templates.txt of its own.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"eval set directory not found: {root}")
    folders = class_folders(root)
    if not folders:
        raise ValueError(f"{root} has no class sub-folders (an eval set is <dir>/<class>/<image>)")
    classnames = resolve_classnames(root, folders)
    prompt_list = read_templates(root, templates) if templates is not False else []
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(path) as img:
                arrays.append(preprocess_eval(img, image_size))
            labels.append(label)
    if not arrays:
        raise ValueError(f"{root}: no images ({'/'.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return LabelledImages(torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64),
                          classnames, prompt_list)


def load_pairs(dataset_dir: str | Path, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """(images float32 [N, 3, S, S], captions) of a shard dataset, in manifest order.

    Bad samples (structural problems, undecodable images) are skipped and counted in a warning, as the
    training pipeline does; an unreadable shard is an error, since silently dropping it would change
    which pairs the retrieval metric is over.
    """
    manifest = Manifest.load(dataset_dir)
    arrays: list[np.ndarray] = []
    captions: list[str] = []
    skipped: dict[str, int] = {}
    for path in manifest.shard_paths(dataset_dir):
        try:
            samples = list(iter_shard(path, fmt=manifest.format, image_field=manifest.image_field,
                                      caption_field=manifest.caption_field))
        except ShardError as err:
            raise ValueError(f"retrieval dataset {dataset_dir}: unreadable shard ({err})") from err
        for sample in samples:
            if isinstance(sample, BadSample) and sample.reason == TRUNCATED:  # part of the set is gone
                raise ValueError(f"retrieval dataset {dataset_dir}: truncated shard {path} ({sample.detail})"
                                 "; re-fetch it: recall over part of the set is not comparable")
            if isinstance(sample, BadSample):
                skipped[sample.reason] = skipped.get(sample.reason, 0) + 1
                continue
            try:
                with Image.open(io.BytesIO(sample.image)) as img:
                    arrays.append(preprocess_eval(img, image_size))
            except Exception:  # Pillow raises many types for bad bytes: a bad sample, not a failed eval
                skipped["undecodable_image"] = skipped.get("undecodable_image", 0) + 1
                continue
            captions.append(sample.caption)
    if skipped:
        log.warning("%s: skipped %d bad samples %s", dataset_dir, sum(skipped.values()), skipped)
    if not arrays:
        raise ValueError(f"retrieval dataset {dataset_dir} holds no readable image-text pairs")
    return torch.from_numpy(np.stack(arrays)), captions
