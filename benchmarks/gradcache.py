"""Gradient-cache benchmarks: time overhead, memory vs global batch, largest batch that fits.

    python benchmarks/gradcache.py time      # cached / plain step time for the CPU presets
    python benchmarks/gradcache.py memory    # peak RSS of one cached step vs B, dense vs tiled loss
    python benchmarks/gradcache.py largest   # the largest global batch of the `micro` preset
    python benchmarks/gradcache.py all

Each memory point runs in a fresh subprocess (`point` mode) so that its RSS high-water mark is its own.
Results are printed as tables; BENCHMARKS.md records them with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from scalelab.gradcache import cached_step
from scalelab.losses import contrastive_loss
from scalelab.models import create_model

DENSE_LIMIT = 16384  # beyond this the dense BxB fp32 matrix and its gradient exceed this 24 GB machine


def _inputs(model, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    spec = model.config
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g)
    tokens = torch.randint(1, spec.vocab_size, (batch, spec.context_length), generator=g)
    tokens[:, spec.context_length * 3 // 4 :] = 0
    return images, tokens


def _plain_step(model, images, tokens, block_size=None) -> None:
    img, txt = model.encode_image(images), model.encode_text(tokens)
    contrastive_loss(img, txt, model.logit_scale.exp(), block_size=block_size).backward()


def _time_pair(model, images, tokens, micro: int, repeats: int) -> tuple[float, float]:
    """Median seconds of a plain and of a cached step, interleaved so machine noise hits both alike."""
    times: dict[str, list[float]] = {"plain": [], "cached": []}
    for i in range(repeats + 1):  # the first round warms up allocator and thread pools
        for kind in times:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            if kind == "plain":
                _plain_step(model, images, tokens)
            else:
                cached_step(model, images, tokens, micro_batch_size=micro, compute_accuracy=False)
            if i:
                times[kind].append(time.perf_counter() - t0)
    return statistics.median(times["plain"]), statistics.median(times["cached"])


def bench_time(presets: list[str], batch: int, micro: int, repeats: int) -> None:
    print(f"\n## cached / plain step time (global batch {batch}, micro-batch {micro}, dense loss, "
          f"median of {repeats}, interleaved)")
    print("| preset | plain s | cached s | cached / plain |\n|---|---|---|---|")
    for preset in presets:
        torch.manual_seed(0)
        model = create_model(preset).train()
        images, tokens = _inputs(model, batch)
        p, c = _time_pair(model, images, tokens, micro, repeats)
        print(f"| {preset} | {p:.3f} | {c:.3f} | {c / p:.3f} |", flush=True)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_point(preset: str, batch: int, micro: int, block: int | None) -> dict:
    """One cached step in this process; returns RSS before the step and the high-water mark."""
    torch.manual_seed(0)
    model = create_model(preset).train()
    images, tokens = _inputs(model, batch)
    base = _rss_now()
    t0 = time.perf_counter()
    result = cached_step(model, images, tokens, micro_batch_size=micro, block_size=block,
                         compute_accuracy=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"batch": batch, "block": block, "base": base, "peak": peak, "seconds": seconds,
            "loss": result.loss, "embed_dim": model.config.embed_dim}


def _point_subprocess(preset: str, batch: int, micro: int, block: int | None) -> dict | None:
    cmd = [sys.executable, __file__, "point", "--preset", preset, "--batch", str(batch),
           "--micro", str(micro)] + (["--block", str(block)] if block else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"   point B={batch} block={block} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(preset: str, batches: list[int], micro: int, block: int) -> None:
    print(f"\n## peak memory of one cached step, preset {preset}, micro-batch {micro} "
          f"(fresh process per point; 'step' = high-water RSS minus RSS with model + inputs loaded;\n"
          f"## 'emb' = the B x D fp32 embeddings, their gradients and the gathered copies: 4 B D 4 bytes)")
    print("| B | loss | step MB | emb MB | step - emb MB | seconds |\n|---|---|---|---|---|---|")
    rows: dict[tuple[str, int], float] = {}
    for batch in batches:
        for name, blk in (("dense", None), (f"tiled/{block}", block)):
            if blk is None and batch > DENSE_LIMIT:
                need = 2 * batch * batch * 4 / 2**30
                print(f"| {batch} | {name} | not run: BxB logits + grad = {need:.0f} GiB | | | |", flush=True)
                continue
            r = _point_subprocess(preset, batch, micro, blk)
            if r is None:
                continue
            step = (r["peak"] - r["base"]) / 2**20
            emb = 4 * batch * r["embed_dim"] * 4 / 2**20
            rows[(name, batch)] = step - emb
            print(f"| {batch} | {name} | {step:.1f} | {emb:.1f} | {step - emb:.1f} | {r['seconds']:.1f} |",
                  flush=True)
    tiled = [v for (n, _), v in sorted(rows.items(), key=lambda kv: kv[0][1]) if n.startswith("tiled")]
    if len(tiled) >= 2:
        print(f"\ntiled: (step - emb) at B={batches[-1]} / at B={batches[0]} = {tiled[-1] / tiled[0]:.2f}")


def bench_largest(preset: str, batches: list[int], micro: int, block: int) -> None:
    print(f"\n## largest global batch, preset {preset}, micro-batch {micro}, tiled loss block {block}")
    print("| B | ok | peak RSS GB | seconds |\n|---|---|---|---|")
    for batch in batches:
        r = _point_subprocess(preset, batch, micro, block)
        if r is None:
            print(f"| {batch} | no | | |", flush=True)
            break
        print(f"| {batch} | yes | {r['peak'] / 2**30:.2f} | {r['seconds']:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["time", "memory", "largest", "all", "point"])
    p.add_argument("--preset", default="micro")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--micro", type=int, default=64)
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}")
    if args.what == "point":
        print(json.dumps(run_point(args.preset, args.batch, args.micro, args.block)))
        return
    if args.what in ("time", "all"):
        bench_time(["micro", "tiny", "small"], args.batch, args.micro, args.repeats)
    if args.what in ("memory", "all"):
        bench_memory("micro", [256, 1024, 4096, 16384, 65536], micro=256, block=1024)
    if args.what in ("largest", "all"):
        bench_largest("micro", [65536, 131072, 262144], micro=512, block=1024)


if __name__ == "__main__":
    main()
