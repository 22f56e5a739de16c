"""Ray Data pipeline: reading blocks, decoding, bad samples, rows and batches per epoch and rank, resume,
cache.

The plan it runs (subset, order, mixing, rank split) is tested without Ray in tests/data/test_plan.py;
the Ray tests here share one local Ray session (module-scoped) and tiny datasets (conftest.py).
"""

import io
import logging
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from scalelab.config import DataConfig, DataSourceConfig
from scalelab.data.manifest import ShardInfo, sha256_file
from scalelab.data.pipeline import (
    UNREADABLE,
    RowAugment,
    _Decode,
    _read_block,
    build_dataset,
    decode_subset,
    iter_cached_epoch,
    iter_train_batches,
    plan_epoch,
    select_subset,
)
from scalelab.data.shards import ShardWriter, finish_dataset
from scalelab.data.tokenizer import train_tokenizer
from scalelab.data.transforms import preprocess_eval, preprocess_train

from ..conftest import caption, data_cfg, png

# Ray's DataContext copy touches its own deprecated attributes.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


# --------------------------------------------------------------------------- reading and decoding (no Ray)
def test_unreadable_shard_is_logged_with_its_path(bad_dataset, caplog):
    cfg = data_cfg([bad_dataset["dir"]])
    slices = tuple(vars(s) for s in select_subset(cfg))
    broken = next(k for k, s in enumerate(slices) if s["path"].endswith("00002.tar"))
    spec = {"slice_id": [broken, broken], "ordinal": [0, 1], "index": [7, 8]}
    with caplog.at_level(logging.WARNING):
        rows = _read_block(spec, slices=slices)
    assert [r["reason"] for r in rows] == [UNREADABLE, UNREADABLE] and not any(r["valid"] for r in rows)
    assert slices[broken]["path"] in caplog.text


def test_iterator_without_ray_raises_when_nothing_is_usable():
    rows = [{"image": np.zeros((3, 4, 4), np.float32), "tokens": np.zeros(8, np.int64), "key": "k",
             "valid": False, "reason": "empty_caption"}] * 5
    it = iter_train_batches(rows, 2)
    with pytest.raises(RuntimeError, match="no usable samples"):
        list(it)
    assert it.skipped == {"empty_caption": 5}


def test_closed_iterator_ends_its_source_mid_epoch():
    closed = []

    def source():
        try:
            for i in range(10):
                yield {"image": np.zeros((3, 4, 4), np.float32), "tokens": np.zeros(8, np.int64),
                       "key": str(i), "valid": True, "reason": ""}
        finally:
            closed.append(True)  # what a Ray Data iteration runs to release its execution

    it = iter_train_batches(source(), 2)
    assert [b.keys for b in (next(it), next(it))] == [["0", "1"], ["2", "3"]]
    it.close()
    assert closed == [True]
    with pytest.raises(StopIteration):
        next(it)


def test_decode_is_seeded_per_row_and_eval_is_deterministic(sources):
    a, _ = sources
    kw = dict(tokenizer=str(a / "tokenizer.json"), image_size=16, context_length=8, augment=True,
              crop_scale=(0.3, 0.6), hflip=True, seed=0, epoch=0)
    batch = {"image_bytes": np.array([png(3), png(3), png(3), b"junk"], dtype=object),
             "caption": np.array(["a red square"] * 4, dtype=object), "valid": np.ones(4, bool),
             "reason": np.array([""] * 4, dtype=object), "key": np.array(list("wxyz"), dtype=object),
             "source": np.zeros(4, np.int64), "index": np.array([5, 5, 6, 7])}
    train = _Decode(train=True, **kw)(batch)
    assert train["image"].shape == (4, 3, 16, 16) and train["tokens"].shape == (4, 8)
    assert np.array_equal(train["image"][0], train["image"][1])  # same (seed, epoch, index): same crop
    assert not np.array_equal(train["image"][0], train["image"][2])  # another index: another crop
    assert train["valid"].tolist() == [True, True, True, False] and train["reason"][3] == "undecodable_image"
    assert (train["tokens"][3] == 0).all() and (train["image"][3] == 0).all()
    evals = _Decode(train=False, **kw)(batch)
    assert np.array_equal(evals["image"][0], evals["image"][2])  # eval ignores the index


def test_decoder_images_are_the_shared_transforms(sources):
    """The pipeline keeps no transform of its own: train rows are `preprocess_train` with the row's
    `RowAugment` stream, eval rows and augment-off rows `preprocess_eval` (what evaluation uses)."""
    a, _ = sources
    images = [png(i) for i in range(4)]
    batch = {"image_bytes": np.array(images, dtype=object),
             "caption": np.array(["a red square"] * 4, dtype=object), "valid": np.ones(4, bool),
             "reason": np.array([""] * 4, dtype=object),
             "key": np.array(list("wxyz"), dtype=object), "source": np.zeros(4, np.int64),
             "index": np.array([3, 9, 4, 11])}
    kw = dict(tokenizer=str(a / "tokenizer.json"), image_size=16, context_length=8, crop_scale=(0.3, 0.9),
              hflip=True, seed=5, epoch=2)
    aug = RowAugment(5, 2, (0.3, 0.9), True)
    train = [preprocess_train(Image.open(io.BytesIO(d)), 16, aug.rng(i), crop_scale=(0.3, 0.9), hflip=True)
             for d, i in zip(images, batch["index"])]
    plain = [preprocess_eval(Image.open(io.BytesIO(d)), 16) for d in images]
    for decode_kw, want in (({"train": True, "augment": True}, train),
                            ({"train": False, "augment": True}, plain),
                            ({"train": True, "augment": False}, plain)):  # hflip alone flips nothing
        got = _Decode(**decode_kw, **kw)(batch)["image"]
        assert got.tobytes() == np.stack(want).tobytes(), decode_kw


def test_parquet_shards_read_through_the_same_plan(tmp_path):
    with ShardWriter(tmp_path / "pq", fmt="parquet", samples_per_shard=10, source="pq") as w:
        for i in range(25):
            w.write(f"p{i:04d}", png(i), caption(i))
    w.finish()
    cfg = data_cfg([tmp_path / "pq"], n_pairs=15)
    plan = plan_epoch(cfg, 1)
    slices = tuple(vars(s) for s in plan.slices)
    spec = {"slice_id": plan.slice_id, "ordinal": plan.ordinal, "index": plan.index}
    rows = _read_block(spec, slices=slices)
    assert len({r["key"] for r in rows}) == 15 and all(r["valid"] for r in rows)
    assert all(r["caption"].startswith("a ") and r["image_bytes"][:4] == b"\x89PNG" for r in rows)


# --------------------------------------------------------------------------- bad samples on disk
def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """00000: 10 good; 00001: 6 good + every kind of bad sample; 00002: unreadable (10 samples)."""
    out = tmp_path_factory.mktemp("bad")
    with ShardWriter(out, samples_per_shard=10, source="bad") as w:
        for i in range(10):
            w.write(f"g{i:05d}", png(i), caption(i))
    infos = w.close()
    members = []
    for i in range(6):
        members += [(f"h{i:05d}.png", png(i)), (f"h{i:05d}.txt", caption(i).encode())]
    members += [("x1.png", b"\x89PNG but not really an image"), ("x1.txt", b"corrupt image bytes")]
    members += [("x2.png", png(1)), ("x2.txt", b"  ")]  # empty caption
    members += [("x3.png", png(2)), ("x3.txt", b"\xff\xfe caption")]  # not UTF-8
    members += [("x4.json", b"{}")]  # orphan member: neither image nor caption
    (out / "00001.tar").write_bytes(_tar_bytes(members))
    whole = _tar_bytes([m for i in range(10) for m in ((f"t{i}.png", png(i)), (f"t{i}.txt", b"cap"))])
    (out / "00002.tar").write_bytes(whole[:300])  # cut inside its first header: unreadable, nothing salvaged
    for name, n in (("00001.tar", 10), ("00002.tar", 10)):
        path = out / name
        infos.append(ShardInfo(path=name, samples=n, bytes=path.stat().st_size, sha256=sha256_file(path)))
    finish_dataset(out, infos, fmt="webdataset", source="bad", image_field="png")
    truncated_only = tmp_path_factory.mktemp("allbad")
    shutil.copy(out / "00002.tar", truncated_only / "00000.tar")
    path = truncated_only / "00000.tar"
    info = ShardInfo(path="00000.tar", samples=10, bytes=path.stat().st_size, sha256=sha256_file(path))
    finish_dataset(truncated_only, [info], fmt="webdataset", source="allbad", image_field="png")
    return {"dir": out, "all_bad": truncated_only}


# --------------------------------------------------------------------------- Ray
@pytest.mark.slow
def test_rows_and_batches_same_subset_every_epoch(local_ray, sources):
    a, _ = sources
    cfg = data_cfg([a], n_pairs=100, seed=2)
    rows0 = build_dataset(cfg, epoch=0).take_all()
    rows1 = build_dataset(cfg, epoch=1).take_all()
    keys0, keys1 = [r["key"] for r in rows0], [r["key"] for r in rows1]
    assert len(keys0) == 100 and set(keys0) == set(keys1) and keys0 != keys1
    assert [r["index"] for r in rows0] == list(range(100))
    it = iter_train_batches(rows0, 16)  # rows from take_all work as input too
    batches = list(it)
    assert len(batches) == 6 and it.samples_seen == 96 and it.skipped == {}  # drop_last
    b = batches[0]
    assert b.images.dtype == torch.float32 and b.images.shape == (16, 3, 32, 32)
    assert b.tokens.dtype == torch.int64 and b.tokens.shape == (16, 16)
    assert (b.tokens[:, 0] == 2).all() and b.keys == keys0[:16]  # bos first, order kept
    assert b.images.std() > 0.1 and b.images.abs().max() < 3  # CLIP-normalised range


@pytest.mark.slow
def test_resume_reproduces_the_remaining_order(local_ray, sources):
    a, b = sources
    cfg = data_cfg([a, b], [2.0, 1.0], n_pairs=120, seed=4)
    full = list(iter_train_batches(build_dataset(cfg, epoch=3), 8))
    # Resumed with 3 blocks decoding at once (data.decode_tasks may change on resume): the order holds.
    parallel = cfg.model_copy(update={"decode_tasks": 3, "decode_cpus": 0.5})
    resumed_it = iter_train_batches(build_dataset(parallel, epoch=3), 8, start_sample=24)
    resumed = list(resumed_it)
    assert len(full) == 15 and len(resumed) == 12
    for x, y in zip(full[3:], resumed):
        assert x.keys == y.keys
        assert torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)  # same crops too
    assert resumed_it.samples_seen == 120


@pytest.mark.slow
def test_mixing_and_rank_split(local_ray, sources):
    a, b = sources
    cfg = data_cfg([a, b], [3.0, 1.0], seed=6)  # 120 + 40
    whole = list(iter_train_batches(build_dataset(cfg, epoch=0), 16))
    per_batch = [sum(k.startswith("b") for k in batch.keys) for batch in whole]
    assert len(whole) == 10 and all(2 <= n <= 6 for n in per_batch) and sum(per_batch) == 40
    ranks = [[r["key"] for r in build_dataset(cfg, epoch=0, rank=r, world_size=2).take_all()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 80 and not set(ranks[0]) & set(ranks[1])
    everything = [k for batch in whole for k in batch.keys]
    assert set(ranks[0]) | set(ranks[1]) == set(everything)
    assert ranks[0] == everything[0::2] and ranks[1] == everything[1::2]  # index ≡ rank (mod 2)


@pytest.mark.slow
def test_bad_samples_are_skipped_and_counted(local_ray, sources, bad_dataset):
    a, _ = sources
    cfg = data_cfg([bad_dataset["dir"]], tokenizer=str(a / "tokenizer.json"))
    it = iter_train_batches(build_dataset(cfg, epoch=0), 4)
    batches = list(it)
    assert it.skipped == {"undecodable_image": 1, "empty_caption": 1, "non_utf8_caption": 1,
                          "orphan_member": 1, UNREADABLE: 10}
    assert it.metrics()["data/skipped/unreadable_shard"] == 10
    assert len(batches) == 4 and it.samples_seen == 16  # 16 good samples
    assert Counter(k[0] for bt in batches for k in bt.keys) == {"g": 10, "h": 6}
    bad = data_cfg([bad_dataset["all_bad"]], tokenizer=str(a / "tokenizer.json"))
    with pytest.raises(RuntimeError, match="no usable samples"):
        list(iter_train_batches(build_dataset(bad, epoch=0), 4))


def _same_batches(want: list, got: list) -> None:
    assert len(want) == len(got) > 0
    for x, y in zip(want, got):
        assert x.keys == y.keys
        assert torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)


@pytest.mark.slow
def test_cached_epochs_equal_the_ray_data_epochs(local_ray, sources, bad_dataset):
    """data.cache: the same batches, in the same order, per epoch and rank, resumed mid-epoch, with the
    same bad rows counted — decoded once instead of once per epoch."""
    a, b = sources
    cfg = data_cfg([a, b, bad_dataset["dir"]], [2.0, 1.0, 1.0], seed=3, augment=False, cache=True,
               tokenizer=str(a / "tokenizer.json"))
    cached = decode_subset(cfg)
    for epoch, rank, start in ((0, 0, 0), (1, 1, 0), (2, 0, 24), (5, 1, 8)):
        plain = iter_train_batches(build_dataset(cfg, epoch=epoch, rank=rank, world_size=2), 8,
                                   start_sample=start)
        mine = iter_train_batches(iter_cached_epoch(cached, cfg, epoch, rank=rank, world_size=2), 8,
                                  start_sample=start)
        _same_batches(list(plain), list(mine))
        assert mine.skipped == plain.skipped and mine.samples_seen == plain.samples_seen
    assert sum(1 for v in cached.columns["valid"] if not v) == 14  # 4 bad samples + 10 unreadable rows
    with pytest.raises(ValueError, match="augment"):
        data_cfg([a], augment=True, cache=True)


@pytest.mark.slow
def test_synth_validate_tokenize_pipeline_train_step(local_ray, tmp_path):
    """The embedded default end to end: synthetic world → validate → tokenizer → Ray pipeline →
    exact-size batches that a model preset consumes in a cached step."""
    from scalelab.data.synth import generate_world
    from scalelab.data.validate import validate_dataset
    from scalelab.gradcache import cached_step
    from scalelab.models import create_model

    world = tmp_path / "synth"
    generate_world(world, n_pairs=90, seed=5, samples_per_shard=40, progress=False, eval_per_class=1,
                   retrieval_pairs=10)
    report = validate_dataset(world)
    assert report.ok and report.good == 90 and report.bad == 0
    tok = train_tokenizer([world], vocab_size=300)
    cfg = DataConfig(sources=[DataSourceConfig(path=str(world))], n_pairs=64, image_size=32,
                     context_length=32, seed=1, decode_batch_size=32)
    batches = iter_train_batches(build_dataset(cfg, epoch=0), 32)
    got = list(batches)
    assert len(got) == 2 and batches.samples_seen == 64 and batches.metrics() == {}
    assert got[0].images.shape == (32, 3, 32, 32) and got[0].images.dtype == torch.float32
    assert got[0].tokens.shape == (32, 32) and got[0].tokens.dtype == torch.int64
    assert int(got[0].tokens.max()) < 300 and tok.exists()
    model = create_model("micro")
    assert model.config.context_length == 32 and model.config.image_size == 32
    result = cached_step(model, got[0].images, got[0].tokens, micro_batch_size=8)
    assert np.isfinite(result.loss) and model.logit_scale.grad is not None
