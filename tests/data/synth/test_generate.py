"""Generation writes exactly N pairs, reproducibly, identically with 1 or 2 workers, via ShardWriter."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scalelab.data.manifest import Manifest
from scalelab.data.shards import RawSample, iter_shard
from scalelab.data.synth import generate_pairs, generate_world, make_pair
from scalelab.data.synth.cli import main as synth_main
from scalelab.data.synth.world import WORLD_VERSION


def _samples(root: Path) -> list[RawSample]:
    manifest = Manifest.load(root)
    out = []
    for path in manifest.shard_paths(root):
        out += list(iter_shard(path, image_field=manifest.image_field, caption_field=manifest.caption_field))
    return out


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("w1")
    generate_pairs(root, n_pairs=53, seed=4, samples_per_shard=20, workers=1, progress=False)
    return root


def test_exactly_n_pairs_in_shards(one_worker):
    manifest = Manifest.load(one_worker)
    assert manifest.num_samples == 53
    assert [s.samples for s in manifest.shards] == [20, 20, 13]
    assert [s.path for s in manifest.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = _samples(one_worker)
    assert all(isinstance(s, RawSample) for s in samples)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(53)]
    with Image.open(io.BytesIO(samples[0].image)) as img:
        assert img.format == "PNG" and img.size == (32, 32)
    meta = samples[0].meta
    assert set(meta["attrs"]) == {"cls", "colour", "size", "position", "count", "background", "style"}
    extra = manifest.extra["synth"]
    assert (extra["seed"], extra["image_size"], extra["mismatch"]) == (4, 32, 0.1)
    assert extra["world_version"] == WORLD_VERSION and len(extra["classes"]) >= 20


def test_sample_i_depends_only_on_seed_and_i(one_worker):
    sample = _samples(one_worker)[37]
    key, image, caption, meta = make_pair(4, 37)
    assert (sample.key, sample.image, sample.caption) == (key, image, caption)
    assert sample.meta == json.loads(json.dumps(meta))


def test_same_seed_same_hashes_two_workers_same_content(one_worker, tmp_path):
    again = generate_pairs(tmp_path / "again", n_pairs=53, seed=4, samples_per_shard=20, progress=False)
    two = generate_pairs(
        tmp_path / "two", n_pairs=53, seed=4, samples_per_shard=20, workers=2, progress=False
    )
    reference = Manifest.load(one_worker)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in reference.shards]
    assert [s.sha256 for s in two.shards] == [s.sha256 for s in reference.shards]
    assert two.content_hash == reference.content_hash


def test_different_seeds_differ(one_worker, tmp_path):
    other = generate_pairs(tmp_path / "s5", n_pairs=53, seed=5, samples_per_shard=20, progress=False)
    assert other.content_hash != Manifest.load(one_worker).content_hash
    a, b = _samples(one_worker), _samples(tmp_path / "s5")
    assert sum(x.image != y.image for x, y in zip(a, b)) > 50


def test_rerun_into_same_dir_leaves_no_stale_shards(tmp_path):
    generate_pairs(tmp_path, n_pairs=30, samples_per_shard=10, progress=False)
    manifest = generate_pairs(tmp_path, n_pairs=12, samples_per_shard=10, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert manifest.num_samples == 12


def test_bad_arguments_are_refused(tmp_path):
    for kwargs in ({"n_pairs": 0}, {"n_pairs": 5, "mismatch": 1.5}, {"n_pairs": 5, "image_size": 2}):
        with pytest.raises(ValueError):
            generate_pairs(tmp_path, progress=False, **kwargs)


def test_world_layout_via_cli(tmp_path, capsys):
    out = tmp_path / "world"
    code = synth_main(
        [
            str(out),
            "--n-pairs",
            "25",
            "--samples-per-shard",
            "10",
            "--eval-per-class",
            "1",
            "--retrieval-pairs",
            "7",
            "--image-size",
            "32",
            "--no-progress",
            "--seed",
            "3",
        ]
    )
    assert code == 0 and "wrote 25 pairs" in capsys.readouterr().out
    assert Manifest.load(out).num_samples == 25
    retrieval = Manifest.load(out / "eval" / "retrieval")
    assert retrieval.num_samples == 7 and retrieval.extra["synth"]["mismatch"] == 0.0
    assert all(s.meta["matched"] for s in _samples(out / "eval" / "retrieval"))
    train_images = {s.image for s in _samples(out)}
    assert not train_images & {s.image for s in _samples(out / "eval" / "retrieval")}
    assert (out / "eval" / "test" / "classnames.txt").is_file()
    assert synth_main([str(tmp_path / "bad"), "--n-pairs", "0", "--no-progress"]) == 2


def test_generate_world_returns_training_manifest(tmp_path):
    manifest = generate_world(
        tmp_path,
        n_pairs=9,
        samples_per_shard=4,
        progress=False,
        eval_per_class=0,
        retrieval_pairs=0,
        image_size=64,
    )
    assert manifest.num_samples == 9 and not (tmp_path / "eval").exists()
    image = _samples(tmp_path)[0].image
    assert Image.open(io.BytesIO(image)).size == (64, 64)
    mismatched = [not s.meta["matched"] for s in _samples(tmp_path)]
    assert np.mean(mismatched) < 0.5
