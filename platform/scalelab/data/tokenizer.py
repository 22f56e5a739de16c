"""Caption tokenizer: train it on a dataset's captions, save it next to the manifest, load it by hash.

A run's file is `tokenizer_path(cfg.data)` (data.tokenizer, else next to the first source's manifest);
the driver finds it there without importing the Ray Data pipeline.

BASIC tokenizes with a SentencePiece model; the default here is the same algorithm (Unigram with
SentencePiece's `▁` word boundaries, HF `tokenizers`), with byte-pair encoding as an option.
Special ids are fixed because other code relies on them: `<pad>` = 0 (the text tower treats token 0
as padding), `<unk>` = 1, `<bos>` = 2, `<eos>` = 3. Training and evaluation must use the same file,
so `CaptionTokenizer.sha256` (the hash of the JSON file's bytes) is recorded with every run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

if TYPE_CHECKING:
    from scalelab.config import DataConfig

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "TOKENIZER_NAME",
    "UNK",
    "CaptionTokenizer",
    "iter_captions",
    "load_tokenizer",
    "tokenizer_path",
    "train_tokenizer",
]

log = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.json"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
# Order = ids: trainers add special tokens first, in this order.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
METASPACE = "\u2581"  # SentencePiece's word-boundary mark


def iter_captions(dataset_dir: str | Path) -> Iterator[str]:
    """Every readable caption of a dataset, in manifest order; bad samples and bad shards skipped."""
    from scalelab.data.manifest import Manifest
    from scalelab.data.shards import BadSample, ShardError, iter_shard

    manifest = Manifest.load(dataset_dir)
    for path in manifest.shard_paths(dataset_dir):
        try:
            for sample in iter_shard(
                path,
                fmt=manifest.format,
                image_field=manifest.image_field,
                caption_field=manifest.caption_field,
            ):
                if not isinstance(sample, BadSample):
                    yield sample.caption
        except (ShardError, OSError) as err:
            log.warning("tokenizer: skipping unreadable shard %s: %s", path, err)


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)


def _new_tokenizer(kind: str, vocab_size: int, lowercase: bool) -> tuple[Tokenizer, trainers.Trainer]:
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token=UNK, show_progress=False
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
    else:
        raise ValueError(f"tokenizer kind must be one of 'unigram', 'bpe'; got {kind!r}")
    tok.normalizer = _normalizer(lowercase)
    # SentencePiece-style word boundaries: spaces become `▁`. Unigram sees whole captions
    # (SentencePiece's split_by_whitespace=false): HF's UnigramTrainer seeds its pieces from substrings
    # repeated across *distinct* pre-tokenized words, so on a small caption vocabulary (synthetic worlds)
    # word splitting leaves it no seeds beyond single characters. Pieces may then span words ("▁on▁the").
    if kind == "unigram":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
    else:
        # BPE merges within words; punctuation is split off so "star," and "star" are the same word
        # (as in CLIP's and GPT-2's BPE).
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(split=True), pre_tokenizers.Punctuation(behavior="isolated")]
        )
    tok.decoder = decoders.Metaspace()
    return tok, trainer


def train_tokenizer(
    dataset_dirs: str | Path | Sequence[str | Path],
    *,
    kind: Literal["unigram", "bpe"] = "unigram",
    vocab_size: int = 4096,
    lowercase: bool = True,
    out: str | Path | None = None,
) -> Path:
    """Train on the captions of datasets; write the JSON (default `<first dataset>/tokenizer.json`).

    Returns the path written. The vocabulary may come out smaller than `vocab_size` on a small corpus.
    """
    dirs = [Path(dataset_dirs)] if isinstance(dataset_dirs, (str, Path)) else [Path(d) for d in dataset_dirs]
    if not dirs:
        raise ValueError("train_tokenizer needs at least one dataset directory")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    tok, trainer = _new_tokenizer(kind, vocab_size, lowercase)
    counter = _Counter(c for d in dirs for c in iter_captions(d))
    tok.train_from_iterator(counter, trainer=trainer)
    if counter.n == 0:
        raise RuntimeError(f"no readable captions in {', '.join(map(str, dirs))}: nothing to train on")
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:  # the text tower's padding convention depends on it
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}, expected {i}")
    path = Path(out) if out is not None else dirs[0] / TOKENIZER_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    log.info("tokenizer (%s, %d tokens, %d captions): %s", kind, tok.get_vocab_size(), counter.n, path)
    return path


class _Counter:
    """Iterable wrapper counting what the trainer consumed (an empty corpus is an error)."""

    def __init__(self, items: Iterable[str]) -> None:
        self._items = items
        self.n = 0

    def __iter__(self) -> Iterator[str]:
        for item in self._items:
            self.n += 1
            yield item


class CaptionTokenizer:
    """A trained tokenizer file: fixed-length id arrays `<bos> ids <eos> <pad>...` for the text tower."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        ids = [self._tok.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise ValueError(f"{self.path}: special tokens {SPECIAL_TOKENS} must have ids 0..3, found {ids}")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode_batch(self, texts: Sequence[str], context_length: int) -> np.ndarray:
        """int64 [B, context_length]; captions too long are cut so that `<eos>` is always the last id."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (bos + eos), got {context_length}")
        out = np.full((len(texts), context_length), self.pad_id, dtype=np.int64)
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        for row, enc in enumerate(encodings):
            ids = [self.bos_id, *enc.ids[: context_length - 2], self.eos_id]
            out[row, : len(ids)] = ids
        return out

    def encode(self, text: str, context_length: int) -> np.ndarray:
        return self.encode_batch([text], context_length)[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, special tokens (padding, unk, bos, eos) dropped."""
        # Joined by hand: HF's Metaspace decoder drops spaces inside multi-word pieces ("▁a▁red").
        special = len(SPECIAL_TOKENS)
        pieces = [self._tok.id_to_token(int(i)) or "" for i in ids if int(i) >= special]
        text = "".join(pieces).replace(METASPACE, " ")
        return text[1:] if text.startswith(" ") else text

    def __repr__(self) -> str:
        return f"CaptionTokenizer({str(self.path)!r}, vocab={self.vocab_size}, sha256={self.sha256[:12]})"


def load_tokenizer(path_or_dataset_dir: str | Path) -> CaptionTokenizer:
    """Load a tokenizer JSON, given its path or the dataset directory holding `tokenizer.json`."""
    path = Path(path_or_dataset_dir)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} — train one with `scalelab data tokenizer DATASET_DIR`"
            " (or set data.tokenizer to an existing tokenizer.json)"
        )
    return CaptionTokenizer(path)


def tokenizer_path(cfg: DataConfig) -> Path:
    """cfg.tokenizer, or tokenizer.json next to the first source's manifest."""
    path = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.sources[0].path) / TOKENIZER_NAME
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} — train one with `scalelab data tokenizer "
            f"{cfg.sources[0].path}` or set data.tokenizer"
        )
    return path
