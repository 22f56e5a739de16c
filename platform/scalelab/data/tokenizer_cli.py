"""`scalelab data tokenizer DATASET_DIR ...`: train the caption tokenizer (argparse wiring only)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_tokenizer_command"]


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from scalelab.data.tokenizer import load_tokenizer, train_tokenizer

    try:
        path = train_tokenizer(
            args.dataset_dirs,
            kind=args.kind,
            vocab_size=args.vocab_size,
            lowercase=args.lowercase,
            out=args.out,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"scalelab data tokenizer: {err}", file=sys.stderr)
        return 2
    tok = load_tokenizer(path)
    print(f"tokenizer: {path}")
    print(f"kind={args.kind} vocab_size={tok.vocab_size} lowercase={args.lowercase} sha256={tok.sha256}")
    return 0


def add_tokenizer_command(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `tokenizer` to the `scalelab data` subcommands; its handler (`args.func`) returns an exit code."""
    p = data_subparsers.add_parser(
        "tokenizer",
        help="train the caption tokenizer (Unigram/SentencePiece-style or BPE) on dataset captions",
        description="Train a tokenizer on the captions of one or more datasets; by default it is written "
        "next to the first dataset's manifest as tokenizer.json. Ids: <pad>=0, <unk>=1, <bos>=2, <eos>=3.",
    )
    p.add_argument("dataset_dirs", nargs="+", metavar="DATASET_DIR", help="dataset dirs (with manifest.json)")
    p.add_argument("--kind", choices=("unigram", "bpe"), default="unigram", help="model (default: unigram)")
    p.add_argument("--vocab-size", type=int, default=4096, help="target vocabulary size (default: 4096)")
    p.add_argument(
        "--lowercase", action=argparse.BooleanOptionalAction, default=True, help="lowercase (default: on)"
    )
    p.add_argument("--out", default=None, help="output JSON path (default: DATASET_DIR/tokenizer.json)")
    p.set_defaults(func=_cmd_tokenizer)
    return p
