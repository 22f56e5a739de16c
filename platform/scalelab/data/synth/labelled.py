"""The synthetic world's labelled image set: its JFT analogue, for the supervised stage (`task: classify`).

N scenes of the world's training distribution, each labelled by what is in it, written as shards
(png + a caption + json) with a manifest, under `<world>/labelled` by `generate_world(labelled=N)`:

    json {"label": class index, "labels": [class index, 23 + colour index], "class": ..., "colour": ...}

- `label`: the object class, indexing the classes in sorted key order — the order of the class
  folders of the world's ImageFolder eval sets, so `eval/test`, `eval/v2`, ... are held-out splits of
  the same label space (softmax head).
- `labels`: class and colour together (23 + 10 labels): a multi-label target, as JFT's images carry
  several labels (sigmoid head).
- caption: "a photo of a <colour> <class>." — the set also serves as a labels-to-text source.

Samples come from their own random stream (`LABELLED_STREAM`): sample i is a function of (seed,
stream, i), so the set shares no scene draw with the image-text pairs (stream 0), the retrieval pairs
(1) or the eval sets (2-7) of the same seed. The manifest's `extra.label_names` names both label spaces,
so `data.labels.num_classes` can be left to the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.manifest import Manifest
from scalelab.data.shards import ShardInfo, ShardWriter, finish_dataset
from scalelab.data.synth.generate import encode_png, run_tasks
from scalelab.data.synth.render import render_scene
from scalelab.data.synth.world import CLASSES, COLOURS, sample_scene, world_config, world_level

__all__ = ["LABELLED_STREAM", "generate_labelled", "label_spaces", "make_labelled"]

LABELLED_STREAM = 8  # streams 0-7: training pairs, retrieval pairs, the eval sets (generate/evalsets)


def label_spaces() -> dict[str, list[str]]:
    """Names of the two label spaces: 'label' (object classes) and 'labels' (classes, then colours)."""
    classes = [CLASSES[k][0] for k in sorted(CLASSES)]
    return {"label": classes, "labels": classes + [f"{c} (colour)" for c in sorted(COLOURS)]}


def make_labelled(seed: int, index: int, *, image_size: int = 32,
                  level: str = "standard") -> tuple[str, bytes, str, dict[str, Any]]:
    """Sample `index` of the labelled set: (key, png bytes, caption, json meta)."""
    rng = np.random.default_rng([seed, LABELLED_STREAM, index])
    attrs = sample_scene(rng, level=level)
    image = render_scene(attrs, image_size, rng)
    cls, colour = sorted(CLASSES).index(attrs.cls), sorted(COLOURS).index(attrs.colour)
    meta = {"label": cls, "labels": [cls, len(CLASSES) + colour], "class": attrs.cls, "colour": attrs.colour}
    return f"{index:09d}", encode_png(image), f"a photo of a {attrs.colour} {CLASSES[attrs.cls][0]}.", meta


def _write_shard(out_dir: str, shard: int, start: int, stop: int, seed: int, image_size: int,
                 samples_per_shard: int, level: str) -> list[ShardInfo]:
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard, source="synth-labelled",
                     start_shard=shard) as w:
        for i in range(start, stop):
            w.write(*make_labelled(seed, i, image_size=image_size, level=level))
    return w.close()


def generate_labelled(out_dir: str | Path, *, n: int, seed: int = 0, image_size: int = 32,
                      samples_per_shard: int = 1000, workers: int = 1, progress: bool = False,
                      level: str = "standard") -> Manifest:
    """Write exactly `n` labelled samples into out_dir as shards + manifest.json (module docstring)."""
    if n <= 0 or samples_per_shard <= 0:
        raise ValueError("n and samples_per_shard must be positive")
    world_level(level)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tar"):  # a rerun with fewer samples must not keep old shards
        stale.unlink()
    tasks = [(str(out), s, s * samples_per_shard, min(n, (s + 1) * samples_per_shard), seed, image_size,
              samples_per_shard, level) for s in range(-(-n // samples_per_shard))]
    infos = run_tasks(_write_shard, tasks, [t[3] - t[2] for t in tasks], workers=workers,
                      progress=progress, desc="synth labelled")
    config = {"seed": seed, "image_size": image_size, "stream": LABELLED_STREAM, "n": n, "level": level,
              **world_config()}
    return finish_dataset(out, [i for part in infos for i in part], fmt="webdataset", source="synth-labelled",
                          image_field="png", caption_field="txt",
                          extra={"synth": config, "label_names": label_spaces(),
                                 "classnames": label_spaces()["label"]})
