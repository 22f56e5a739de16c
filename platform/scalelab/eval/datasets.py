"""Evaluation inputs: ImageFolder zero-shot sets and shard-dataset retrieval pairs, preprocessed for eval.

An ImageFolder set is `<dir>/<class folder>/<image>` plus `classnames.txt` (one readable class name per
line, in sorted folder order) and `templates.txt` (prompt templates containing `{c}`), as written by
`scalelab.data.synth.generate_eval_sets`. Retrieval pairs are a shard dataset (manifest.json + shards).

Preprocessing is CLIP's eval transform — shorter side to S, centre crop, bicubic, CLIP mean/std — the
same as the eval branch of `scalelab.data.pipeline._Decode`. It is re-implemented here rather than
imported because pipeline.py imports Ray, which `eval` must not (shared/design.md); a test checks that
both give identical arrays.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scalelab.data.manifest import Manifest
from scalelab.data.shards import BadSample, ShardError, iter_shard
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


CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
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


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an eval set needs {CLASSNAMES_FILE} and {TEMPLATES_FILE} "
                                f"next to its class folders")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_classnames(directory: str | Path) -> list[str]:
    """Readable class names of an ImageFolder set, one per class folder in sorted folder order."""
    names = _lines(Path(directory) / CLASSNAMES_FILE)
    if not names:
        raise ValueError(f"{Path(directory) / CLASSNAMES_FILE} is empty")
    return names


def read_templates(directory: str | Path) -> list[str]:
    """Prompt templates of an ImageFolder set; each must contain the `{c}` placeholder."""
    path = Path(directory) / TEMPLATES_FILE
    templates = _lines(path)
    if not templates:
        raise ValueError(f"{path} is empty: give at least one prompt template such as 'a photo of a {{c}}.'")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"{path}: templates without the {{c}} placeholder: {bad[:5]}")
    return templates


def load_image_folder(directory: str | Path, image_size: int) -> LabelledImages:
    """Load every image of an ImageFolder set (layout in the module docstring), preprocessed for eval."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"eval set directory not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    classnames = read_classnames(root)
    templates = read_templates(root)
    if len(classnames) != len(folders):
        raise ValueError(f"{root}: {CLASSNAMES_FILE} names {len(classnames)} classes but there are "
                         f"{len(folders)} class folders ({[f.name for f in folders][:10]})")
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
                          classnames, templates)


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
