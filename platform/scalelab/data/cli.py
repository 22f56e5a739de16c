"""`scalelab data …`: thin subcommands over the data library (validate, index, labels → pairs, exports).

    scalelab data validate DIR [--json] [--no-decode]   counts per shard; exit 1 if a shard is unreadable
                                                        or truncated (its intact samples still count)
    scalelab data index DIR [--source S] [--skip-unreadable] [--no-decode]   manifest for foreign shards
    scalelab data from-labels FOLDER OUT [--templates FILE] [--seed N] [--samples-per-shard N]
    scalelab data export-digits OUT                     scikit-learn digits → ImageFolder (PNG)
    scalelab data export-fashion-mnist OUT [--split train|test] [--limit N]

`add_data_commands(subparsers)` attaches them to the main parser; every handler returns an exit code
(0 ok, 1 dataset not ok, 2 refused input), with errors on stderr rather than tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_data_commands"]


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the errors a user can fix (missing paths, bad input, unreadable shards) into exit code 2."""
    from scalelab.data.shards import ShardError

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (FileNotFoundError, ValueError, ShardError) as err:
            print(f"scalelab data {args.data_command}: error: {err}", file=sys.stderr)
            return 2

    run.__name__ = handler.__name__
    return run


def _cmd_validate(args: argparse.Namespace) -> int:
    from scalelab.data.validate import validate_dataset

    report = validate_dataset(args.dir, decode=not args.no_decode)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1


def _cmd_index(args: argparse.Namespace) -> int:
    from scalelab.data.validate import index_dataset

    manifest = index_dataset(
        args.dir, source=args.source, skip_unreadable=args.skip_unreadable, decode=not args.no_decode
    )
    problems = manifest.extra.get("index", {}).get("problems", {})
    skipped = manifest.extra.get("index", {}).get("skipped", [])
    print(
        f"indexed {args.dir}: {manifest.format}, {len(manifest.shards)} shards, {manifest.num_samples} good "
        f"samples, image_field={manifest.image_field}, content_hash={manifest.content_hash[:12]}"
    )
    if problems:
        print("bad samples left out: " + ", ".join(f"{k}={v}" for k, v in problems.items()))
    if skipped:
        print("shards left out (unreadable or truncated): " + ", ".join(skipped))
    return 0


DEFAULT_TEMPLATE = "a photo of a {}."  # CLIP's default prompt


def _cmd_from_labels(args: argparse.Namespace) -> int:
    from scalelab.data.labels import TEMPLATES_FILE, from_labels

    templates: Any = args.templates or Path(args.folder) / TEMPLATES_FILE
    if args.templates and not Path(templates).is_file():
        raise FileNotFoundError(f"no templates file {templates}")
    if not Path(templates).is_file():  # e.g. a tree for `task: classify`, which reads only the labels
        templates = [DEFAULT_TEMPLATE]
        print(f"no {TEMPLATES_FILE} in {args.folder}: every caption is {DEFAULT_TEMPLATE!r} (pass "
              "--templates FILE for more; a classify run reads only the json labels)")
    manifest = from_labels(
        args.folder, args.out, templates=templates, seed=args.seed, samples_per_shard=args.samples_per_shard
    )
    print(
        f"wrote {manifest.num_samples} pairs in {len(manifest.shards)} shards to {args.out} "
        f"({len(manifest.extra['classnames'])} classes, {len(manifest.extra['templates'])} templates)"
    )
    return 0


def _cmd_export_digits(args: argparse.Namespace) -> int:
    from scalelab.data.labels import export_digits

    print(f"wrote scikit-learn digits to {export_digits(args.out)}")
    return 0


def _cmd_export_fashion_mnist(args: argparse.Namespace) -> int:
    from scalelab.data.labels import FASHION_MNIST_DIR, export_fashion_mnist

    source = args.source_dir or FASHION_MNIST_DIR
    out = export_fashion_mnist(args.out, source_dir=source, split=args.split, limit=args.limit)
    print(f"wrote Fashion-MNIST ({args.split}) to {out}")
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data` with its subcommands to the main parser's subparsers; returns the `data` parser."""
    data = subparsers.add_parser("data", help="validate, index and create datasets (shards + manifest)")
    sub = data.add_subparsers(dest="data_command", required=True)

    v = sub.add_parser(
        "validate",
        help="read every shard; count good samples and each problem (exit 1: shard unreadable or truncated)",
    )
    v.add_argument("dir", help="dataset directory")
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.add_argument("--no-decode", action="store_true", help="skip decoding images (structure only)")
    v.set_defaults(func=_guarded(_cmd_validate))

    i = sub.add_parser("index", help="write manifest.json for shards written elsewhere (e.g. img2dataset)")
    i.add_argument("dir", help="directory of *.tar or *.parquet shards")
    i.add_argument("--source", default="index", help="source name recorded in the manifest")
    i.add_argument("--skip-unreadable", action="store_true", help="leave unreadable shards out")
    i.add_argument("--no-decode", action="store_true", help="count samples without decoding images (faster)")
    i.set_defaults(func=_guarded(_cmd_index))

    f = sub.add_parser("from-labels", help="ImageFolder tree → captioned shards via prompt templates")
    f.add_argument("folder", help="one sub-folder per class; optional classnames.txt at the root")
    f.add_argument("out", help="output dataset directory (empty)")
    f.add_argument("--templates",
                   help="templates file, one per line with {} or {c} (default FOLDER/templates.txt, "
                   "else 'a photo of a {}.')")
    f.add_argument("--seed", type=int, default=0, help="seed of the template choice and sample order")
    f.add_argument("--samples-per-shard", type=int, default=1000)
    f.set_defaults(func=_guarded(_cmd_from_labels))

    d = sub.add_parser("export-digits", help="scikit-learn digits → ImageFolder of PNGs")
    d.add_argument("out")
    d.set_defaults(func=_guarded(_cmd_export_digits))

    m = sub.add_parser("export-fashion-mnist", help="Fashion-MNIST idx files → ImageFolder of PNGs")
    m.add_argument("out")
    m.add_argument("--split", choices=["train", "test"], default="train")
    m.add_argument("--limit", type=int, default=None, help="first N images only")
    m.add_argument(
        "--source-dir",
        help="directory of the idx files (default: where Debian's dataset-fashion-mnist puts them)",
    )
    m.set_defaults(func=_guarded(_cmd_export_fashion_mnist))

    # The synthetic world and the tokenizer live in their own modules; they register here so that
    # `scalelab data --help` lists every dataset command in one place.
    from scalelab.data.synth.cli import add_synth_command
    from scalelab.data.tokenizer_cli import add_tokenizer_command

    add_synth_command(sub)
    add_tokenizer_command(sub)
    return data
