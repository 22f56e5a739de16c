"""The synthetic labelled set: the world's classes, its own random stream (disjoint from the pairs)."""

from scalelab.data.shards import iter_shard
from scalelab.data.synth import generate_labelled, make_labelled, make_pair
from scalelab.data.synth.world import CLASSES, COLOURS


def test_labels_name_what_is_drawn_and_stream_is_disjoint_from_the_pairs(tmp_path):
    manifest = generate_labelled(tmp_path, n=40, seed=3, samples_per_shard=16)
    assert manifest.num_samples == 40 and len(manifest.shards) == 3
    names = manifest.extra["label_names"]
    assert names["label"] == manifest.extra["classnames"]
    assert len(names["labels"]) == len(CLASSES) + len(COLOURS)
    samples = [s for p in manifest.shard_paths(tmp_path) for s in iter_shard(p)]
    classes = sorted(CLASSES)
    for s in samples:
        cls, colour = s.meta["labels"]
        assert s.meta["label"] == cls and classes[cls] == s.meta["class"]
        assert sorted(COLOURS)[colour - len(CLASSES)] == s.meta["colour"]
        assert CLASSES[s.meta["class"]][0] in s.caption
    assert len({s.meta["label"] for s in samples}) > 10  # the world's classes, not one
    # Same seed and index as the image-text pairs, another stream: other scenes, other pixels.
    pairs = {make_pair(3, i)[1] for i in range(40)}
    assert not pairs & {s.image for s in samples}
    assert make_labelled(3, 5)[1] == samples[5].image  # sample i is a function of (seed, i)
