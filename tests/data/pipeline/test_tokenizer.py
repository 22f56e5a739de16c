"""Caption tokenizer: trained on a dataset's captions; pad 0, bos/eos placement, truncation, hash, errors;
found for a config (`tokenizer_path`)."""

import argparse
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from scalelab.data.shards import ShardWriter
from scalelab.data.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_NAME,
    iter_captions,
    load_tokenizer,
    tokenizer_path,
    train_tokenizer,
)
from scalelab.data.tokenizer_cli import add_tokenizer_command

from ..conftest import data_cfg

COLORS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
WORDS = ["on", "the", "LEFT", "right", "of", "a", "small", "big", "photo", "near", "above", "below"]
N = 300


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((seed * 37) % 256, 80, 160)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokds")
    with ShardWriter(out, samples_per_shard=100, source="test") as w:
        for i in range(N):
            r = random.Random(i)
            words = [r.choice(WORDS) for _ in range(r.randint(2, 6))]
            caption = f"A {r.choice(COLORS)} {r.choice(SHAPES)} {' '.join(words)}"
            w.write(f"{i:09d}", _png(i), caption)
    w.finish()
    return out


def test_bpe_words_are_the_same_tokens_with_or_without_punctuation(dataset, tmp_path):
    path = train_tokenizer(dataset, kind="bpe", vocab_size=300, out=tmp_path / "bpe.json")
    tok = load_tokenizer(path)
    bare, tagged = tok.encode("a red circle", 16), tok.encode("circle, red", 16)
    circle = [t for t in bare.tolist() if t not in (0, 2, 3)][-1]
    assert circle in tagged.tolist()[:2]  # "circle," is "circle" + ","


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_round_trip_pad_bos_eos(dataset, tmp_path, kind):
    path = train_tokenizer(dataset, kind=kind, vocab_size=200, out=tmp_path / "tok.json")
    tok = load_tokenizer(path)
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id] == [0, 1, 2, 3]
    captions = ["A Red circle on the LEFT", "a blue star above a big photo"]
    ids = tok.encode_batch(captions, context_length=48)
    assert ids.dtype == np.int64 and ids.shape == (2, 48)
    for row, caption in zip(ids, captions):
        n = int((row != 0).sum())
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        assert (row[n:] == 0).all() and (row[1 : n - 1] > 3).all()  # no special ids inside
        assert tok.decode(row) == caption.lower()  # lowercased words come back, spaces exact
        assert n - 2 <= len(caption.split())  # whole words or larger pieces, not characters


def test_truncation_keeps_eos_last(dataset, tmp_path):
    tok = load_tokenizer(train_tokenizer(dataset, vocab_size=100, out=tmp_path / "t.json"))
    long = " ".join(["red circle green square"] * 20)
    row = tok.encode_batch([long], context_length=8)[0]
    assert row[0] == tok.bos_id and row[-1] == tok.eos_id and (row != 0).all()
    assert tok.decode(row) and long.startswith(tok.decode(row).split(" ")[0])
    with pytest.raises(ValueError, match="context_length"):
        tok.encode_batch(["x"], context_length=1)


def test_no_lowercase_and_nfkc(dataset, tmp_path):
    tok = load_tokenizer(train_tokenizer(dataset, vocab_size=100, lowercase=False, out=tmp_path / "t.json"))
    assert tok.decode(tok.encode("LEFT", 8)) == "LEFT"
    lower = load_tokenizer(train_tokenizer(dataset, vocab_size=100, out=tmp_path / "l.json"))
    assert lower.decode(lower.encode("ｒｅｄ", 8)) == "red"  # NFKC folds full-width letters


def test_default_location_hash_and_json(dataset):
    path = train_tokenizer(dataset, vocab_size=100)
    assert path == dataset / TOKENIZER_NAME
    tok = load_tokenizer(dataset)  # the dataset dir is enough
    import hashlib

    assert tok.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert tok.path == path and 4 < tok.vocab_size <= 100
    vocab = json.loads(path.read_text())["model"]["vocab"]
    assert [v[0] for v in vocab[:4]] == list(SPECIAL_TOKENS)  # unigram: [token, score] in id order
    assert len(list(iter_captions(dataset))) == N


_UNIGRAM_VARIES = pytest.mark.xfail(strict=True, reason=(
    "HF's UnigramTrainer is not reproducible: the same pieces come out with other scores (single "
    "characters swap their small fallback penalties, other scores move in the last bits), so in another id "
    "order; a world whose tokenizer is trained again trains differently from its first step"))


@pytest.mark.parametrize("kind", [pytest.param("unigram", marks=_UNIGRAM_VARIES), "bpe"])
def test_training_twice_gives_the_same_tokenizer(dataset, tmp_path, kind):
    """A tokenizer is an input of the run: trained again on the same captions it must be the same file."""
    files = [train_tokenizer(dataset, kind=kind, vocab_size=200, out=tmp_path / f"{i}.json")
             for i in range(3)]
    assert files[1].read_bytes() == files[0].read_bytes() == files[2].read_bytes()


def test_errors(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="scalelab data tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(dataset, kind="wordpiece", out=tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="manifest"):
        train_tokenizer(tmp_path / "missing", out=tmp_path / "x.json")


def test_cli(dataset, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_tokenizer_command(parser.add_subparsers())
    out = tmp_path / "cli.json"
    args = parser.parse_args(
        [
            "tokenizer",
            str(dataset),
            "--kind",
            "bpe",
            "--vocab-size",
            "80",
            "--no-lowercase",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    assert load_tokenizer(out).sha256 in capsys.readouterr().out
    bad = parser.parse_args(["tokenizer", str(tmp_path / "missing")])
    assert bad.func(bad) == 2


def test_tokenizer_path_of_a_config(sources, tmp_path):
    a, _ = sources
    assert tokenizer_path(data_cfg([a])) == a / "tokenizer.json"  # next to the first source's manifest
    assert tokenizer_path(data_cfg([tmp_path], tokenizer=str(a))) == a / "tokenizer.json"  # a directory
    with pytest.raises(FileNotFoundError, match="scalelab data tokenizer"):
        tokenizer_path(data_cfg([tmp_path]))
