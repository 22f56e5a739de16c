"""Retrieval recall@k against a naive double loop; loading retrieval pairs from a shard dataset."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from scalelab.data.manifest import Manifest, ShardInfo, sha256_file
from scalelab.eval.datasets import load_pairs
from scalelab.eval.retrieval import positive_ranks, retrieval_metrics


def _naive_recall(q, c, k):
    """Double loop: rank of candidate i among all candidates for query i, by sorting the scores."""
    hits = 0
    for i in range(len(q)):
        scores = [float(np.dot(q[i], c[j])) for j in range(len(c))]
        order = sorted(range(len(c)), key=lambda j: -scores[j])
        hits += order.index(i) < k
    return hits / len(q)


@pytest.mark.parametrize(("n", "chunk"), [(23, 5), (7, 64), (10, 1)])
def test_recall_matches_naive_double_loop(n, chunk):
    rng = np.random.default_rng(n)
    img = rng.normal(size=(n, 6))
    txt = img + 1.2 * rng.normal(size=(n, 6))  # correlated, so recall is neither 0 nor 1
    got = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), ks=(1, 5, 10), chunk=chunk)
    want = {f"i2t_r{k}": _naive_recall(img, txt, k) for k in (1, 5, 10)}
    want |= {f"t2i_r{k}": _naive_recall(txt, img, k) for k in (1, 5, 10)}
    assert got == pytest.approx(want, abs=0)
    assert got["i2t_r1"] <= got["i2t_r5"] <= got["i2t_r10"]


def test_identical_pairs_and_collapsed_embeddings():
    emb = torch.nn.functional.normalize(torch.randn(12, 4, dtype=torch.float64), dim=1)
    assert set(retrieval_metrics(emb, emb).values()) == {1.0}
    same = torch.ones(12, 4)  # every score ties: ties count against the positive
    assert positive_ranks(same, same).tolist() == [11] * 12
    assert retrieval_metrics(same, same)["i2t_r10"] == 0.0


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="matching"):
        retrieval_metrics(torch.zeros(3, 2), torch.zeros(4, 2))


def _png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (12, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _member(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_load_pairs_skips_bad_samples(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tf:
        _member(tf, "a.png", _png((255, 0, 0)))
        _member(tf, "a.txt", b"a red thing")
        _member(tf, "b.png", b"not an image")  # undecodable
        _member(tf, "b.txt", b"broken")
        _member(tf, "c.png", _png((0, 0, 255)))  # no caption
        _member(tf, "d.png", _png((0, 255, 0)))
        _member(tf, "d.txt", b"a green thing")
    info = ShardInfo(path=shard.name, samples=4, bytes=shard.stat().st_size, sha256=sha256_file(shard))
    Manifest.build(fmt="webdataset", source="test", image_field="png", caption_field="txt",
                   shards=[info]).save(tmp_path)
    images, captions = load_pairs(tmp_path, 4)
    assert captions == ["a red thing", "a green thing"]
    assert images.shape == (2, 3, 4, 4) and images.dtype == torch.float32
    assert images[0, 0].mean() > images[0, 1].mean()  # red channel dominates the first image


def test_load_pairs_needs_a_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_pairs(tmp_path, 4)
