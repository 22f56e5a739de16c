"""Build the whole synthetic world on disk: training pairs, retrieval pairs and the zero-shot eval sets.

Layout (the training dataset is `out_dir` itself, so DataConfig's default source `runs/data/synth`
points straight at it):

    out_dir/manifest.json, 00000.tar, ...   training pairs (alt-text-like, `mismatch` noisy)
    out_dir/eval/retrieval/                 held-out matched pairs for image<->text retrieval (shards)
    out_dir/eval/<set>/                     ImageFolder eval sets (see evalsets.py)
    out_dir/labelled/                       labelled images of the world's classes (labelled.py; optional)
"""

from __future__ import annotations

from pathlib import Path

from scalelab.data.manifest import Manifest
from scalelab.data.synth.evalsets import EVAL_SETS, generate_eval_sets
from scalelab.data.synth.generate import RETRIEVAL_STREAM, TRAIN_STREAM, generate_pairs
from scalelab.data.synth.labelled import generate_labelled

__all__ = ["generate_world"]


def generate_world(out_dir: str | Path, *, n_pairs: int, seed: int = 0, image_size: int = 32,
                   mismatch: float = 0.1, samples_per_shard: int = 1000, workers: int = 1,
                   progress: bool = True, eval_per_class: int = 20,
                   retrieval_pairs: int = 1000, level: str = "standard", labelled: int = 0) -> Manifest:
    """Write the world under out_dir (layout above) and return the training manifest.

    `eval_per_class` images per class and eval set (0 skips the eval sets); `retrieval_pairs` held-out
    pairs (0 skips them); `labelled` labelled images under out_dir/labelled (0: none). Every image
    is a pure function of (seed, purpose, index, level); `level` names
    a world.LEVELS entry (how hard the world is).
    """
    out = Path(out_dir)
    eval_root = out / "eval"
    eval_info = {"eval_per_class": eval_per_class, "retrieval_pairs": retrieval_pairs,
                 "eval_sets": list(EVAL_SETS) if eval_per_class else []}
    manifest = generate_pairs(out, n_pairs=n_pairs, seed=seed, image_size=image_size, mismatch=mismatch,
                              samples_per_shard=samples_per_shard, workers=workers, progress=progress,
                              stream=TRAIN_STREAM, level=level, extra={"eval": eval_info})
    if retrieval_pairs:
        generate_pairs(eval_root / "retrieval", n_pairs=retrieval_pairs, seed=seed, image_size=image_size,
                       mismatch=0.0, samples_per_shard=samples_per_shard, workers=workers,
                       progress=progress, stream=RETRIEVAL_STREAM, level=level)
    if eval_per_class:
        generate_eval_sets(eval_root, seed=seed, image_size=image_size, per_class=eval_per_class,
                           workers=workers, progress=progress, level=level)
    if labelled:
        generate_labelled(out / "labelled", n=labelled, seed=seed, image_size=image_size,
                          samples_per_shard=samples_per_shard, workers=workers, progress=progress,
                          level=level)
    return manifest
