"""Input-pipeline throughput: Ray Data pipeline vs a plain single-process loop vs what training consumes.

    python benchmarks/data.py                         # 4000 pairs, 64 px, 2 CPUs, 1 and 2 decode tasks
    python benchmarks/data.py --n-pairs 1000 --sizes 32 64 --tasks 2

Input shards are generated here (Pillow-drawn PNGs, 500 per shard, slightly larger than the training
resolution so every sample is cropped and resized) in a temporary directory, plus a Unigram tokenizer.
- plain: one process reads the shards with `iter_shard` and runs the pipeline's own decode stage
  (Pillow decode, random-resized-crop, CLIP normalisation, tokenization) in batches — no Ray.
- ray: `build_dataset` + `iter_train_batches(batch 256)` on a local Ray instance with 2 CPUs, end to end
  (each epoch builds a new dataset; its decode tasks run in Ray's pooled worker processes); epoch 1
  is measured after a warm-up epoch 0.
- train: samples/s of one gradient-cache step (`cached_step`, batch 256, micro 64) of the `tiny` preset
  (32 px) with plain autograd on the same 2 CPUs — the rate the data must keep up with.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from scalelab.config import DataConfig, DataSourceConfig
from scalelab.data.shards import ShardWriter, iter_shard
from scalelab.data.tokenizer import train_tokenizer

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "left", "right", "top", "small"]


def make_dataset(out: Path, n_pairs: int, size: int, seed: int = 0) -> Path:
    """n_pairs PNG pairs of (size+8) x size px with a drawn shape and a caption; writes the tokenizer too."""
    rng = np.random.default_rng(seed)
    with ShardWriter(out, samples_per_shard=500, source="bench") as w:
        for i in range(n_pairs):
            img = Image.new("RGB", (size + 8, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            ImageDraw.Draw(img).ellipse((x0, y0, x0 + size // 3, y0 + size // 3),
                                        fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
            w.write(f"{i:09d}", buf.getvalue(), f"a photo of a {caption}")
    w.finish()
    train_tokenizer(out, vocab_size=512)
    return out


def _cfg(path: Path, size: int, tasks: int) -> DataConfig:
    return DataConfig(sources=[DataSourceConfig(path=str(path))], image_size=size, context_length=32,
                      decode_tasks=tasks, decode_batch_size=256)


def plain_loop(path: Path, size: int) -> float:
    """Samples/s of a single process reading the shards and running the same decode stage."""
    from scalelab.data.pipeline import _Decode

    decode = _Decode(str(path / "tokenizer.json"), size, 32, True, True, (0.7, 1.0), False, 0, 0)
    start, n, rows = time.perf_counter(), 0, []
    for shard in sorted(path.glob("*.tar")):
        for s in iter_shard(shard):
            rows.append(s)
            if len(rows) == 256:
                n += _decode_rows(decode, rows)
                rows = []
    n += _decode_rows(decode, rows) if rows else 0
    return n / (time.perf_counter() - start)


def _decode_rows(decode, rows) -> int:
    batch = {"image_bytes": np.array([r.image for r in rows], dtype=object),
             "caption": np.array([r.caption for r in rows], dtype=object),
             "valid": np.ones(len(rows), bool), "reason": np.array([""] * len(rows), dtype=object),
             "key": np.array([r.key for r in rows], dtype=object), "source": np.zeros(len(rows), np.int64),
             "index": np.arange(len(rows), dtype=np.int64)}
    return int(decode(batch)["valid"].sum())


def ray_pipeline(path: Path, size: int, tasks: int) -> tuple[float, float, float]:
    """(end-to-end samples/s, seconds to the first batch, samples/s after it) for epoch 1.

    Epoch 0 warms up the page cache and Ray's worker pool; each epoch builds a new dataset.
    """
    from scalelab.data.pipeline import build_dataset, iter_train_batches

    cfg = _cfg(path, size, tasks)
    result = (0.0, 0.0, 0.0)
    for epoch in (0, 1):
        start = time.perf_counter()
        first, n = None, 0
        for b in iter_train_batches(build_dataset(cfg, epoch=epoch), 256):
            if first is None:
                first = time.perf_counter()
            n += b.images.shape[0]
        end = time.perf_counter()
        result = (n / (end - start), first - start, (n - 256) / max(end - first, 1e-9))
    return result


def train_rate(batch: int = 256, micro: int = 64, repeats: int = 3) -> float:
    """Samples/s of the `tiny` preset's gradient-cache step (forward x2 + backward) on this CPU."""
    from scalelab.gradcache import cached_step
    from scalelab.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny")
    spec = model.config
    images = torch.randn(batch, 3, spec.image_size, spec.image_size)
    tokens = torch.randint(4, spec.vocab_size, (batch, spec.context_length))
    times = []
    for _ in range(repeats + 1):  # first step warms up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        cached_step(model, images, tokens, micro_batch_size=micro)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-pairs", type=int, default=4000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    import ray

    torch.set_num_threads(2)
    train = train_rate()
    rows = []
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths have a length limit
        ray.init(num_cpus=2, object_store_memory=1_000_000_000, include_dashboard=False, _temp_dir=ray_tmp,
                 log_to_driver=False)
        try:
            for size in args.sizes:
                path = make_dataset(Path(tmp) / f"px{size}", args.n_pairs, size)
                plain = plain_loop(path, size)
                rows.append((f"plain loop, 1 process, {size} px", plain, plain, "", ""))
                for tasks in args.tasks:
                    rate, first, steady = ray_pipeline(path, size, tasks)
                    rows.append((f"ray pipeline, {tasks} task(s), {size} px", rate, plain, f"{first:.1f}",
                                 f"{steady:,.0f}"))
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"\n{args.n_pairs} pairs, 2 CPUs; training consumes {train:,.0f} samples/s "
          "(tiny preset, 32 px, cached_step batch 256 / micro 64)\n")
    print(f"| {'what':<36} | {'samples/s':>9} | {'vs plain':>8} | {'vs train':>8} | {'1st batch s':>11} "
          f"| {'after 1st /s':>12} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 13}|{'-' * 14}|")
    for name, rate, plain, first, steady in rows:
        print(f"| {name:<36} | {rate:>9,.0f} | {rate / plain:>7.2f}x | {rate / train:>7.2f}x | {first:>11} "
              f"| {steady:>12} |")
    print(f"| {'train step (tiny, cached, 256/64)':<36} | {train:>9,.0f} | {'':>8} | {1:>7.2f}x | {'':>11} "
          f"| {'':>12} |")


if __name__ == "__main__":
    main()
