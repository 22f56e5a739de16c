"""Synthetic-world generation throughput: pairs/s with 1 and 2 worker processes at 32 and 64 px.

    python benchmarks/synth.py                  # 2000 pairs per point
    python benchmarks/synth.py --n-pairs 500 --sizes 32

Each point generates the training pairs end to end (sample, caption, render, PNG-encode, validate and
write shards + manifest) into a temporary directory; eval sets are not included. Multi-worker points
include the start-up of the spawned worker processes (about a second each), as a real run does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from scalelab.data.synth import generate_pairs


def measure(n_pairs: int, image_size: int, workers: int, samples_per_shard: int) -> float:
    """Wall-clock seconds to generate n_pairs at image_size with `workers` processes."""
    with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
        start = time.perf_counter()
        generate_pairs(tmp, n_pairs=n_pairs, image_size=image_size, workers=workers,
                       samples_per_shard=samples_per_shard, progress=False)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-pairs", type=int, default=2000)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples-per-shard", type=int, default=250,
                   help="small shards so that every worker gets several (load balance)")
    args = p.parse_args()
    print(f"synthetic world generation, {args.n_pairs} pairs per point, {os.cpu_count()} CPUs visible")
    print(f"{'px':>4} {'workers':>8} {'seconds':>8} {'pairs/s':>9} {'pairs/s/core':>13}")
    for size in args.sizes:
        for workers in args.workers:
            seconds = measure(args.n_pairs, size, workers, args.samples_per_shard)
            rate = args.n_pairs / seconds
            print(f"{size:>4} {workers:>8} {seconds:>8.2f} {rate:>9.0f} {rate / workers:>13.0f}")


if __name__ == "__main__":
    main()
