"""Locked image tower (LiT) vs unlocked: time of one cached step, same model, batch and micro-batches.

    python benchmarks/lock.py                                   # the demo presets, the demo's geometry
    python benchmarks/lock.py --presets tiny small --batch 256 --micro 64

An unlocked cached step runs each tower's forward twice and its backward once (≈ 4 forwards); a locked
tower is encoded once without autograd and never replayed (1 forward), so with image and text MACs I and
T per sample the step's MACs fall from 4(I + T) to I + 4T. The table prints that MAC ratio beside the
measured time ratio (the loss and per-call overheads, not in MACs, pull the measured ratio towards 1).
Repetitions are interleaved after a warm-up round, so machine noise hits both kinds alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradcache import _inputs  # benchmarks/gradcache.py: this script's folder is on sys.path
from scalelab.gradcache import cached_step
from scalelab.models import create_model, preset_stats

DEMO_PRESETS = ("pico", "nano", "micro")  # the demo sweep's model axis (sweeps/demo.yaml)


def _models(preset: str) -> dict[str, torch.nn.Module]:
    """The same initial weights twice: trained as is, and with the image tower locked for good."""
    models = {}
    for kind in ("unlocked", "locked"):
        torch.manual_seed(0)
        model = create_model(preset).train()
        if kind == "locked":  # what train/image_tower.prepare_model does for `model.image.lock: true`
            model.lock_image_tower(True)
            model.image_tower.requires_grad_(False)
        models[kind] = model
    return models


def time_preset(preset: str, batch: int, micro: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each repetition of an unlocked and of a locked cached step (gradients included, no
    optimizer step)."""
    models = _models(preset)
    images, tokens = _inputs(models["unlocked"], batch)
    times: dict[str, list[float]] = {kind: [] for kind in models}
    for i in range(repeats + 1):  # round 0 warms up the allocator and the thread pools
        for kind, model in models.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            cached_step(model, images, tokens, micro_batch_size=micro, compute_accuracy=False,
                        lock_image=kind == "locked")
            if i:
                times[kind].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(DEMO_PRESETS))
    parser.add_argument("--batch", type=int, default=128, help="global batch (experiments/demo.yaml: 128)")
    parser.add_argument("--micro", type=int, default=32, help="micro-batch, both towers (demo: 32)")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"\n## locked / unlocked cached step (global batch {args.batch}, micro-batch {args.micro}, dense "
          f"loss, {args.repeats} interleaved repetitions; {torch.get_num_threads()} threads)")
    # Both the median and the fastest repetition: on a shared machine other processes inflate single
    # repetitions, and the minimum is the least disturbed estimate of what the step itself costs.
    print("| preset | image MACs share | unlocked s (median / min) | locked s (median / min) | "
          "locked / unlocked (median / min) | MAC ratio |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        stats = preset_stats(preset)
        image, text = stats.image_macs, stats.text_macs
        t = time_preset(preset, args.batch, args.micro, args.repeats)
        med = {k: statistics.median(v) for k, v in t.items()}
        low = {k: min(v) for k, v in t.items()}
        mac_ratio = (image + 4 * text) / (4 * (image + text))
        print(f"| {preset} | {image / (image + text):.2f} | {med['unlocked']:.4f} / {low['unlocked']:.4f} | "
              f"{med['locked']:.4f} / {low['locked']:.4f} | {med['locked'] / med['unlocked']:.3f} / "
              f"{low['locked'] / low['unlocked']:.3f} | {mac_ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
