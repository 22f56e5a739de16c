"""Shard writers and reader: round trips, reproducible bytes, refusals, foreign img2dataset tars."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from scalelab.data.manifest import Manifest, sha256_file
from scalelab.data.shards import (
    TRUNCATED,
    BadSample,
    RawSample,
    ShardError,
    ShardWriter,
    finish_dataset,
    iter_shard,
    split_member_name,
    tar_member_names,
)


def _img(value: int, fmt: str = "PNG", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 40, 200)).save(buf, fmt)
    return buf.getvalue()


def _write(out, fmt, n=7, per_shard=3, **kw):
    with ShardWriter(out, fmt=fmt, samples_per_shard=per_shard, source="test", **kw) as w:
        for i in range(n):
            w.write(f"{i:09d}", _img(i), f"caption number {i}", {"i": i} if i % 2 else None)
    return w


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_round_trip(tmp_path, fmt):
    manifest = _write(tmp_path, fmt).finish()
    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    assert [s.path for s in manifest.shards] == [f"0000{i}{suffix}" for i in range(3)]
    assert [s.samples for s in manifest.shards] == [3, 3, 1]
    assert Manifest.load(tmp_path) == manifest
    samples = [
        s
        for p in manifest.shard_paths(tmp_path)
        for s in iter_shard(
            p, fmt=fmt, image_field=manifest.image_field, caption_field=manifest.caption_field
        )
    ]
    assert all(isinstance(s, RawSample) for s in samples)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(7)]
    assert [s.caption for s in samples] == [f"caption number {i}" for i in range(7)]
    assert [s.meta for s in samples] == [{"i": i} if i % 2 else None for i in range(7)]
    assert samples[4].image == _img(4)
    for info in manifest.shards:
        assert info.sha256 == sha256_file(tmp_path / info.path)
        assert info.bytes == (tmp_path / info.path).stat().st_size


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_two_writes_give_identical_bytes_and_hashes(tmp_path, fmt):
    a = _write(tmp_path / "a", fmt).finish()
    b = _write(tmp_path / "b", fmt).finish()
    assert a.content_hash == b.content_hash
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_tar_layout_is_grouped_with_fixed_metadata(tmp_path):
    _write(tmp_path, "webdataset", n=2).close()
    with tarfile.open(tmp_path / "00000.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["000000000.png", "000000000.txt", "000000001.png", "000000001.txt",
                                         "000000001.json"]  # fmt: skip
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}


def test_parallel_writers_with_disjoint_ranges_then_one_manifest(tmp_path):
    shards = []
    for part in range(2):
        with ShardWriter(tmp_path, samples_per_shard=2, start_shard=part * 100) as w:
            for i in range(3):
                w.write(f"p{part}_{i}", _img(i), f"part {part} sample {i}")
        shards += w.close()
    m = finish_dataset(tmp_path, shards, fmt="webdataset", source="par", image_field="png")
    assert [s.path for s in m.shards] == ["00000.tar", "00001.tar", "00100.tar", "00101.tar"]
    assert m.num_samples == 6 and m.caption_field == "txt"
    with pytest.raises(ValueError, match="missing"):
        finish_dataset(tmp_path / "nowhere", shards, fmt="webdataset", source="x", image_field="png")


@pytest.mark.parametrize(
    "key, image, caption, meta, message",
    [
        ("k.1", _img(1), "ok", None, "dots"),
        ("", _img(1), "ok", None, "non-empty"),
        ("/abs", _img(1), "ok", None, "slashes"),
        ("k", _img(1), "", None, "empty"),
        ("k", _img(1), "  \n", None, "empty"),
        ("k", _img(1), b"\xff\xfe bad", None, "UTF-8"),
        ("k", _img(1), "lone \ud800 surrogate", None, "UTF-8"),
        ("k", b"not an image", "ok", None, "decoded"),
        ("k", _img(1)[:30], "ok", None, "decoded"),
        ("k", b"", "ok", None, "non-empty bytes"),
        ("k", _img(1, "JPEG"), "ok", None, "JPEG"),
        ("k", _img(1), "ok", ["not", "a", "dict"], "dict"),
        ("k", _img(1), "ok", {"x": object()}, "JSON"),
    ],
)
def test_writer_refuses_bad_input(tmp_path, key, image, caption, meta, message):
    with ShardWriter(tmp_path) as w, pytest.raises(ValueError, match=message):
        w.write(key, image, caption, meta)


def test_writer_refuses_duplicate_keys_bad_options_and_late_writes(tmp_path):
    w = ShardWriter(tmp_path)
    w.write("a", _img(1), "first")
    with pytest.raises(ValueError, match="already written"):
        w.write("a", _img(2), "second")
    w.close()
    with pytest.raises(ValueError, match="after close"):
        w.write("b", _img(2), "late")
    for kw in ({"fmt": "zip"}, {"samples_per_shard": 0}, {"image_ext": "gif"}, {"start_shard": -1}):
        with pytest.raises(ValueError):
            ShardWriter(tmp_path, **kw)


def test_parquet_writer_accepts_any_decodable_image(tmp_path):
    with ShardWriter(tmp_path, fmt="parquet", image_column="jpg") as w:
        w.write("a", _img(1, "JPEG"), "a jpeg in a parquet shard")
    m = w.finish()
    assert (m.image_field, m.caption_field) == ("jpg", "caption")
    assert pq.read_table(tmp_path / "00000.parquet").column_names == ["key", "jpg", "caption", "json"]


def test_failed_writer_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, samples_per_shard=2) as w:
        for i in range(3):
            w.write(str(i), _img(i), f"sample {i}")
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]


def test_reads_foreign_img2dataset_tar(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tf:  # as img2dataset writes: jpg, txt, json per key
        for i, ext in zip(range(120, 124), ["jpg", "jpg", "jpeg", "webp"]):
            key = f"{i:09d}" if i < 123 else f"part-00/{i:09d}"
            _add(tf, f"{key}.{ext}", _img(i, {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[ext]))
            _add(tf, f"{key}.txt", f"alt text {i}".encode())
            _add(
                tf,
                f"{key}.json",
                json.dumps({"key": key, "url": f"http://x/{i}", "status": "success"}).encode(),
            )
    samples = list(iter_shard(path))
    assert [s.key for s in samples] == ["000000120", "000000121", "000000122", "part-00/000000123"]
    assert all(isinstance(s, RawSample) for s in samples)
    assert samples[3].meta["url"] == "http://x/123"
    assert Image.open(io.BytesIO(samples[3].image)).format == "WEBP"


def _members(path):
    with tarfile.open(path) as tf:
        return {m.name: m for m in tf.getmembers()}


def _cut_copy(src, dst, cut: int):
    dst.write_bytes(src.read_bytes()[:cut])
    return dst


# Our writer's shard of 5 samples: keys 000000000..4, png + txt, and a json on odd keys.
# (cut position, good samples before it, key of the truncated_shard item)
CUTS = [
    pytest.param(lambda m: m["000000002.png"].offset_data + 10, 2, "000000002", id="mid_image_data"),
    pytest.param(lambda m: m["000000002.txt"].offset + 100, 2, "000000002", id="mid_caption_header"),
    pytest.param(lambda m: m["000000002.png"].offset + 100, 2, "", id="mid_header_between_samples"),
    pytest.param(lambda m: m["000000002.txt"].offset, 2, "000000002", id="boundary_inside_a_sample"),
    pytest.param(lambda m: m["000000003.png"].offset, 3, "", id="boundary_between_samples"),
    pytest.param(lambda m: m["000000004.txt"].offset_data + 512, 5, "", id="no_end_marker"),
]


@pytest.mark.parametrize("cut_at, good, cut_key", CUTS)
def test_truncated_tar_yields_the_samples_before_the_cut_then_the_cut(tmp_path, cut_at, good, cut_key):
    _write(tmp_path, "webdataset", n=5, per_shard=5).close()
    whole = tmp_path / "00000.tar"
    cut = cut_at(_members(whole))
    got = list(iter_shard(_cut_copy(whole, tmp_path / "cut.tar", cut)))
    assert got[:-1] == list(iter_shard(whole))[:good]  # same keys, bytes, captions, meta
    assert all(isinstance(s, RawSample) for s in got[:-1])
    assert got[-1].key == cut_key and got[-1].reason == TRUNCATED == "truncated_shard"
    assert f"cut at byte {cut}" in got[-1].detail


def test_truncated_img2dataset_tar_keeps_whole_samples_with_their_json(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(4):
            key = f"{i:09d}"
            _add(tf, f"{key}.jpg", _img(i, "JPEG"))
            _add(tf, f"{key}.txt", f"alt text {i}".encode())
            _add(tf, f"{key}.json", json.dumps({"key": key, "url": f"http://x/{i}"}).encode())
    cut = _members(path)["000000002.json"].offset_data + 5  # mid-way through sample 2's last member
    got = list(iter_shard(_cut_copy(path, tmp_path / "cut.tar", cut)))
    assert [(s.key, s.meta["url"]) for s in got[:2]] == [("000000000", "http://x/0"), ("000000001", "http://x/1")]
    assert got[2] == BadSample("000000002", TRUNCATED, f"cut at byte {cut}, inside member 000000002.json")
    assert len(got) == 3
    assert tar_member_names(tmp_path / "cut.tar")[-1] == "000000002.json"  # headers before the cut


def test_corrupt_header_mid_tar_keeps_what_precedes_it(tmp_path):
    _write(tmp_path, "webdataset", n=4, per_shard=4).close()
    whole = tmp_path / "00000.tar"
    at = _members(whole)["000000002.png"].offset
    data = bytearray(whole.read_bytes())
    data[at : at + 512] = b"garbage!" * 64
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    got = list(iter_shard(tmp_path / "bad.tar"))
    assert got[:-1] == list(iter_shard(whole))[:2]
    assert got[-1] == BadSample("", TRUNCATED, f"corrupt header at byte {at}")


def test_tar_cut_inside_its_first_header_is_unreadable_with_its_path(tmp_path):
    _write(tmp_path, "webdataset", n=2).close()
    bad = _cut_copy(tmp_path / "00000.tar", tmp_path / "bad.tar", 300)
    with pytest.raises(ShardError) as err:
        list(iter_shard(bad))
    assert err.value.path == bad and str(bad) in str(err.value) and "truncated" in str(err.value)


def test_truncated_parquet_is_unreadable_with_its_path(tmp_path):
    """Parquet keeps the schema and every row group's offset in the footer, at the end of the file: a
    file cut short cannot be salvaged, so the reader says so, naming the file."""
    _write(tmp_path, "parquet", n=6, per_shard=6).close()
    whole = tmp_path / "00000.parquet"
    assert len(list(iter_shard(whole))) == 6
    bad = _cut_copy(whole, tmp_path / "cut.parquet", whole.stat().st_size // 2)
    with pytest.raises(ShardError) as err:
        list(iter_shard(bad))
    assert err.value.path == bad and str(bad) in str(err.value)
    assert "truncated (no footer)" in err.value.reason


def test_unreadable_parquet_and_missing_columns_raise_shard_error(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ShardError, match="parquet"):
        list(iter_shard(tmp_path / "x.parquet"))
    pq.write_table(pa.table({"key": ["a"], "caption": ["c"]}), tmp_path / "y.parquet")
    with pytest.raises(ShardError, match="no image column"):
        list(iter_shard(tmp_path / "y.parquet"))


def test_foreign_parquet_rows_are_classified(tmp_path):
    rows = {
        "key": ["a", "b", "c", "a", "d"],
        "jpg": [_img(1), None, _img(3), _img(4), _img(5)],
        "caption": [b"fine", b"no image", b"\xff\xfe", b"again", b"with bad json"],
        "json": ['{"x": 1}', None, None, None, "{oops"],
    }
    table = pa.table({**rows, "caption": pa.array(rows["caption"], pa.binary())})
    pq.write_table(table, tmp_path / "f.parquet")
    got = [
        (s.key, s.reason if isinstance(s, BadSample) else "ok") for s in iter_shard(tmp_path / "f.parquet")
    ]
    assert got == [("a", "ok"), ("b", "missing_image"), ("c", "non_utf8_caption"), ("a", "ungrouped"),
                   ("d", "bad_json")]  # fmt: skip


def test_split_member_name_follows_webdataset():
    assert split_member_name("000000123.jpg") == ("000000123", "jpg")
    assert split_member_name("a.b/000000123.seg.PNG") == ("a.b/000000123", "seg.png")
    assert split_member_name("part/key") == ("part/key", "")
