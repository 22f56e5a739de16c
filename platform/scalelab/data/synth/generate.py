"""Generate the synthetic world as a shard dataset: N image-caption pairs, in parallel, reproducibly.

Sample i is a pure function of (seed, stream, i): its generator is seeded with that triple, so any subset
can be regenerated and the bytes do not depend on the number of worker processes. Each worker task
writes whole shards (shard s holds samples [s*k, (s+1)*k)) through its own ShardWriter with a disjoint
`start_shard`; one `finish_dataset` then writes the manifest.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from scalelab.data.manifest import MANIFEST_NAME, Manifest
from scalelab.data.shards import ShardInfo, ShardWriter, finish_dataset
from scalelab.data.synth.captions import caption_pair
from scalelab.data.synth.render import render_scene
from scalelab.data.synth.world import sample_scene, world_config, world_level

__all__ = ["RETRIEVAL_STREAM", "TRAIN_STREAM", "encode_png", "generate_pairs", "make_pair", "run_tasks"]

# Independent random streams per purpose, so the retrieval and eval sets never repeat a training scene.
TRAIN_STREAM = 0
RETRIEVAL_STREAM = 1

T = TypeVar("T")


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes (deterministic: no timestamps or text chunks)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def make_pair(seed: int, index: int, *, image_size: int = 32, mismatch: float = 0.1,
              stream: int = TRAIN_STREAM, level: str = "standard") -> tuple[str, bytes, str, dict[str, Any]]:
    """Sample `index` of the world: (key, png bytes, caption, meta); depends only on its arguments."""
    rng = np.random.default_rng([seed, stream, index])
    attrs = sample_scene(rng, level=level)
    # Caption randomness gets its own child stream so a mismatch draw never changes the pixels.
    caption_rng, render_rng = rng.spawn(2)
    caption, meta = caption_pair(attrs, caption_rng, mismatch, level=level)
    image = render_scene(attrs, image_size, render_rng)
    return f"{index:09d}", encode_png(image), caption, meta


def _write_shard(out_dir: str, shard: int, start: int, stop: int, seed: int, image_size: int,
                 mismatch: float, stream: int, samples_per_shard: int, level: str) -> list[ShardInfo]:
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard, source="synth", start_shard=shard) as w:
        for i in range(start, stop):
            w.write(*make_pair(seed, i, image_size=image_size, mismatch=mismatch, stream=stream, level=level))
    return w.close()


def run_tasks(fn: Callable[..., T], tasks: list[tuple[Any, ...]], weights: Iterable[int], *, workers: int,
              progress: bool, desc: str) -> list[T]:
    """Run fn(*task) for every task, inline when workers == 1, else in `workers` spawned processes;
    the progress bar advances by each finished task's weight. Results come back in task order."""
    weights = list(weights)
    results: list[Any] = [None] * len(tasks)
    with tqdm(total=sum(weights), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for k, task in enumerate(tasks):
                results[k] = fn(*task)
                bar.update(weights[k])
            return results
        # spawn, not fork: the parent may hold torch/Ray threads, which fork would copy half-locked.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
            futures = {pool.submit(fn, *task): k for k, task in enumerate(tasks)}
            for fut in as_completed(futures):
                k = futures[fut]
                results[k] = fut.result()
                bar.update(weights[k])
    return results


def _remove_previous(out_dir: Path) -> None:
    """Delete the shards and manifest of an earlier dataset in out_dir, so no stale shard survives."""
    if not (out_dir / MANIFEST_NAME).is_file():
        return
    for path in Manifest.load(out_dir).shard_paths(out_dir):
        path.unlink(missing_ok=True)
    (out_dir / MANIFEST_NAME).unlink()


def generate_pairs(out_dir: str | Path, *, n_pairs: int, seed: int = 0, image_size: int = 32,
                   mismatch: float = 0.1, samples_per_shard: int = 1000, workers: int = 1,
                   progress: bool = True, stream: int = TRAIN_STREAM, level: str = "standard",
                   extra: dict[str, Any] | None = None) -> Manifest:
    """Write exactly `n_pairs` samples of stream `stream` into out_dir as shards + manifest.json."""
    if n_pairs <= 0 or samples_per_shard <= 0 or workers <= 0:
        raise ValueError("n_pairs, samples_per_shard and workers must be positive")
    if not 0.0 <= mismatch < 1.0:
        raise ValueError(f"mismatch must be in [0, 1), got {mismatch}")
    if not 8 <= image_size <= 512:
        raise ValueError(f"image_size must be in [8, 512] (32-128 intended), got {image_size}")
    world_level(level)  # refuse an unknown level before touching out_dir
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous(out)
    n_shards = -(-n_pairs // samples_per_shard)
    tasks = [(str(out), s, s * samples_per_shard, min(n_pairs, (s + 1) * samples_per_shard), seed,
              image_size, mismatch, stream, samples_per_shard, level) for s in range(n_shards)]
    per_task = run_tasks(_write_shard, tasks, [t[3] - t[2] for t in tasks], workers=workers,
                         progress=progress, desc=f"synth {out.name}")
    config = {"seed": seed, "image_size": image_size, "mismatch": mismatch, "stream": stream,
              "n_pairs": n_pairs, "level": level,
              "level_spec": world_level(level).spec(), **world_config()}
    return finish_dataset(out, [info for infos in per_task for info in infos], fmt="webdataset",
                          source="synth", image_field="png", caption_field="txt",
                          extra={"synth": config, **(extra or {})})
