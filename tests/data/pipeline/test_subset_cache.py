"""The decoded subset on disk (data/subset_cache.py): a later run on the same data loads exactly what
decoding gives, without decoding; anything a row depends on changes the key."""

import os

import numpy as np
import pytest

from scalelab.data import subset_cache
from scalelab.data.pipeline import decode_subset
from scalelab.data.subset_cache import cached_decode, subset_key

from ..conftest import data_cfg


def _equal(want, got) -> None:
    assert want.slices == got.slices
    assert np.array_equal(want.offsets, got.offsets)
    assert want.columns.keys() == got.columns.keys()
    for k in want.columns:
        assert np.array_equal(want.columns[k], got.columns[k]), k


@pytest.mark.slow
def test_second_run_loads_what_decoding_gives(local_ray, sources, tmp_path, monkeypatch):
    a, b = sources
    cfg = data_cfg([a, b], [2.0, 1.0], seed=3, augment=False, cache=True,
                   tokenizer=str(a / "tokenizer.json"))
    tmp_path = tmp_path / "cache"
    reference = decode_subset(cfg)
    first = cached_decode(cfg, tmp_path)
    _equal(reference, first)
    [written] = tmp_path.glob("*.pkl")
    assert written.stem == subset_key(cfg) and not list(tmp_path.glob("*.tmp"))

    def no_decoding(_cfg):
        raise AssertionError("decoded although the subset is on disk")

    monkeypatch.setattr(subset_cache, "decode_subset", no_decoding)
    _equal(reference, cached_decode(cfg, tmp_path))

    written.write_bytes(written.read_bytes()[:100])  # truncated: decoded again and replaced
    monkeypatch.setattr(subset_cache, "decode_subset", decode_subset)
    _equal(reference, cached_decode(cfg, tmp_path))
    monkeypatch.setattr(subset_cache, "decode_subset", no_decoding)
    _equal(reference, cached_decode(cfg, tmp_path))


def test_key_follows_what_rows_depend_on(sources, tmp_path):
    a, b = sources
    cfg = data_cfg([a, b], augment=False, cache=True, tokenizer=str(a / "tokenizer.json"), n_pairs=100)
    key = subset_key(cfg)
    assert subset_key(cfg) == key  # stable
    same = [cfg.model_copy(update={"decode_batch_size": 7, "decode_tasks": 3, "decode_cpus": 0.5})]
    assert {subset_key(c) for c in same} == {key}  # speed settings do not change rows
    changed = [cfg.model_copy(update={"n_pairs": 90}), cfg.model_copy(update={"seed": 1}),
               cfg.model_copy(update={"image_size": 24}), cfg.model_copy(update={"context_length": 8}),
               data_cfg([b, a], augment=False, cache=True, tokenizer=str(a / "tokenizer.json"), n_pairs=100)]
    keys = [subset_key(c) for c in changed]
    assert key not in keys and len(set(keys)) == len(keys)

    tok = tmp_path / "tokenizer.json"  # the same vocabulary file, one byte different
    tok.write_bytes((a / "tokenizer.json").read_bytes() + b"\n")
    assert subset_key(cfg.model_copy(update={"tokenizer": str(tok)})) != key
    shard = next(a.glob("*.tar"))
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place
    try:
        assert subset_key(cfg) != key
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert subset_key(cfg) == key


def test_without_a_directory_nothing_is_written(sources, tmp_path, monkeypatch):
    a, _ = sources
    cfg = data_cfg([a], augment=False, cache=True, tokenizer=str(a / "tokenizer.json"))
    monkeypatch.setattr(subset_cache, "decode_subset", lambda c: "decoded")
    assert cached_decode(cfg, None) == "decoded"
    assert not list(tmp_path.iterdir())
