"""Manifest: build / save / load round trip, derived fields, and refusals that name the file."""

import json

import pytest

from scalelab.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, content_hash

H1, H2 = "a" * 64, "b" * 64


def _shards():
    return [
        ShardInfo(path="00001.tar", samples=3, bytes=100, sha256=H2),
        ShardInfo(path="00000.tar", samples=5, bytes=200, sha256=H1),
    ]


def _build(**kw):
    args = dict(fmt="webdataset", source="test", image_field="png", caption_field="txt", shards=_shards())
    return Manifest.build(**{**args, **kw})


def test_build_sorts_shards_and_fills_derived_fields():
    m = _build(extra={"classnames": ["a", "b"]})
    assert [s.path for s in m.shards] == ["00000.tar", "00001.tar"]
    assert m.num_samples == 8
    assert m.content_hash == content_hash(m.shards)
    assert m.scalelab_version and m.created.endswith("+00:00")
    assert m.extra == {"classnames": ["a", "b"]}


def test_content_hash_depends_on_shard_hashes_in_order_not_on_time():
    a, b = _build(), _build()
    assert a.content_hash == b.content_hash
    swapped = [s.model_copy(update={"sha256": H1 if s.sha256 == H2 else H2}) for s in _shards()]
    assert _build(shards=swapped).content_hash != a.content_hash


def test_save_load_round_trip(tmp_path):
    m = _build()
    path = m.save(tmp_path)
    assert path == tmp_path / MANIFEST_NAME
    assert Manifest.load(tmp_path) == m
    assert Manifest.load(path) == m
    assert m.shard_paths(tmp_path) == [tmp_path / "00000.tar", tmp_path / "00001.tar"]
    assert not list(tmp_path.glob("*.tmp"))


def test_load_missing_names_the_path_and_the_index_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="scalelab data index") as err:
        Manifest.load(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(err.value)


def test_load_invalid_json_names_the_path(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        Manifest.load(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_samples": 9}, "num_samples"),
        ({"content_hash": "0" * 64}, "content_hash"),
        ({"format": "zip"}, "format"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_load_refuses_inconsistent_manifests(tmp_path, change, message):
    data = _build().model_dump(mode="json")
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**data, **change}))
    with pytest.raises(ValueError, match=message):
        Manifest.load(tmp_path)


def test_shard_paths_must_be_relative():
    bad = [ShardInfo(path="/abs/00000.tar", samples=1, bytes=1, sha256=H1)]
    with pytest.raises(ValueError, match="relative"):
        _build(shards=bad)
    with pytest.raises(ValueError):
        ShardInfo(path="x.tar", samples=1, bytes=1, sha256="not-a-hash")
