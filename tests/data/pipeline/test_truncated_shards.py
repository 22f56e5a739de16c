"""A truncated tar shard in the pipeline: the rows before the cut are read (by ordinal, out of order)
and come out valid, byte for byte as from the whole shard; the rows from the cut on are invalid with
reason truncated_shard and counted as data/skipped/truncated_shard. Ray through conftest's local_ray."""

import io
import logging
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from scalelab.config import DataConfig, DataSourceConfig
from scalelab.data.pipeline import _read_block, build_dataset, iter_train_batches, select_subset
from scalelab.data.shards import TRUNCATED, ShardWriter
from scalelab.data.tokenizer import train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

CUT_ITEM = 17  # of 00001.tar (keys t000040..t000079): t000057 is cut, t000040..56 are intact
LOST = {f"t{i:06d}" for i in range(40 + CUT_ITEM, 80)}


def _png(i: int) -> bytes:
    img = Image.new("RGB", (32 + i % 5, 32), (i * 3 % 256, 128, 255 - i % 256))
    img.paste((230, 40, 40), (4, 4, 12 + i % 9, 16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(whole, cut): 3 shards x 40 pairs; in `cut`, 00001.tar ends inside item 17's image and the
    manifest is the whole one (as when a download is cut after the manifest was written)."""
    whole = tmp_path_factory.mktemp("trunc") / "whole"
    with ShardWriter(whole, samples_per_shard=40, source="t") as w:
        for i in range(120):
            w.write(f"t{i:06d}", _png(i), f"a red mark number {i % 11}")
    w.finish()
    train_tokenizer(whole, kind="bpe", vocab_size=120)
    cut = whole.parent / "cut"
    shutil.copytree(whole, cut)
    path = cut / "00001.tar"
    with tarfile.open(path) as tf:
        at = tf.getmember(f"t{40 + CUT_ITEM:06d}.png").offset_data + 20
    path.write_bytes(path.read_bytes()[:at])
    return whole, cut


def _cfg(path, tokenizer) -> DataConfig:
    return DataConfig(sources=[DataSourceConfig(path=str(path))], image_size=32, context_length=16,
                      decode_batch_size=16, tokenizer=str(tokenizer))


def test_rows_are_read_by_ordinal_up_to_the_cut(worlds, caplog):
    whole, cut = worlds
    slices = {d: tuple(vars(s) for s in select_subset(_cfg(d, whole / "tokenizer.json"))) for d in worlds}
    k = next(k for k, s in enumerate(slices[cut]) if s["path"].endswith("00001.tar"))
    ordinals = [39, 0, 16, 17, 5, 18]  # random access, out of order, on both sides of the cut
    spec = {"slice_id": [k] * 6, "ordinal": ordinals, "index": list(range(6))}
    want = _read_block(spec, slices=slices[whole])
    with caplog.at_level(logging.WARNING):
        got = _read_block(spec, slices=slices[cut])
    assert all(r["valid"] for r in want)
    assert [g == w for g, w in zip(got, want)] == [False, True, True, False, True, False]
    assert [(got[i]["key"], got[i]["valid"], got[i]["reason"]) for i in (3, 5, 0)] == [
        ("t000057", False, TRUNCATED), ("", False, TRUNCATED), ("", False, TRUNCATED)]
    assert "truncated shard" in caplog.text and slices[cut][k]["path"] in caplog.text


@pytest.mark.slow
def test_training_rows_before_the_cut_equal_the_whole_shards(local_ray, worlds):
    whole, cut = worlds
    rows = {d: build_dataset(_cfg(d, whole / "tokenizer.json"), epoch=0).take_all() for d in worlds}
    assert [r["index"] for r in rows[cut]] == [r["index"] for r in rows[whole]] == list(range(120))
    for want, got in zip(rows[whole], rows[cut]):
        assert want["valid"]
        if want["key"] in LOST:
            assert not got["valid"] and got["reason"] == TRUNCATED
        else:  # same sample, same crop (seeded by position), same tokens
            assert got["valid"] and got["key"] == want["key"]
            assert np.array_equal(got["image"], want["image"])
            assert np.array_equal(got["tokens"], want["tokens"])
    it = iter_train_batches(rows[cut], 16)
    batches = list(it)
    assert it.skipped == {TRUNCATED: 23} and it.metrics() == {"data/skipped/truncated_shard": 23}
    assert len(batches) == 6 and it.samples_seen == 96  # 97 valid rows, drop_last
    assert not LOST & {key for b in batches for key in b.keys}
