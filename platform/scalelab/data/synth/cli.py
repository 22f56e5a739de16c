"""`scalelab data synth OUT ...`: generate the synthetic world from the command line.

The lead's `scalelab data` parser calls `add_synth_command(data_subparsers)`; the subcommand's
`func(args)` returns the process exit code. Heavy imports happen only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

__all__ = ["add_synth_command", "main", "run_synth"]


def add_synth_command(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `synth` subcommand to `scalelab data`'s subparsers; returns its parser."""
    p = data_subparsers.add_parser(
        "synth", help="generate the synthetic image-text world (train shards + eval sets)",
        description="Write N training pairs as shards + manifest.json into OUT, held-out retrieval pairs "
        "into OUT/eval/retrieval and ImageFolder zero-shot sets into OUT/eval/<set>.",
    )
    p.add_argument("out", metavar="OUT", help="output directory (the training dataset's directory)")
    p.add_argument("--n-pairs", type=int, default=20000, help="training pairs to write (exactly)")
    p.add_argument("--seed", type=int, default=0, help="world seed: sample i depends only on (seed, i)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (32-128)")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--mismatch", type=float, default=0.1, help="fraction of captions of another scene")
    p.add_argument("--eval-per-class", type=int, default=20, help="images per class per eval set (0: none)")
    p.add_argument("--retrieval-pairs", type=int, default=1000, help="held-out retrieval pairs (0: none)")
    p.add_argument("--labelled", type=int, default=0, metavar="N",
                   help="also write N labelled images of the world's classes into OUT/labelled (shards whose "
                   "json holds label / labels: the training data of task: classify); 0: none")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--level", default="standard", help="world difficulty: standard (the full world) or "
                   "easy (one large centred object, terse captions: accuracy rises within minutes on a CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_synth)
    return p


def run_synth(args: argparse.Namespace) -> int:
    """Generate the world as `args` say; print a one-line summary; return the exit code."""
    from scalelab.data.synth.build import generate_world

    start = time.perf_counter()
    try:
        manifest = generate_world(
            args.out, n_pairs=args.n_pairs, seed=args.seed, image_size=args.image_size,
            mismatch=args.mismatch, samples_per_shard=args.samples_per_shard, workers=args.workers,
            progress=not args.no_progress, eval_per_class=args.eval_per_class,
            retrieval_pairs=args.retrieval_pairs, level=args.level, labelled=args.labelled,
        )
    except ValueError as err:
        print(f"scalelab data synth: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"wrote {manifest.num_samples} pairs in {len(manifest.shards)} shards to {args.out} "
          f"({seconds:.1f} s, content {manifest.content_hash[:12]}); eval sets in {args.out}/eval"
          + (f"; {args.labelled} labelled images in {args.out}/labelled" if args.labelled else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (`python -m scalelab.data.synth.cli OUT ...`), same options as the subcommand."""
    parser = argparse.ArgumentParser(prog="scalelab data")
    add_synth_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["synth", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
