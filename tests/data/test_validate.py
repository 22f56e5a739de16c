"""validate_dataset counts every kind of problem with the right reason; index_dataset writes manifests
for foreign shards (img2dataset layout) that then validate clean."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from scalelab.data.manifest import MANIFEST_NAME, Manifest, sha256_file
from scalelab.data.shards import ShardError, ShardWriter, iter_shard
from scalelab.data.validate import index_dataset, validate_dataset


def _img(value: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 90, 30)).save(buf, fmt)
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _img2dataset_dir(root, shards=2, per_shard=4, ext="jpg"):
    """What img2dataset leaves: NNNNN.tar (jpg, txt, json), a metadata NNNNN.parquet, NNNNN_stats.json."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            members += [(f"{key}.{ext}", _img(i)), (f"{key}.txt", f"a photo {key}".encode()),
                        (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())]  # fmt: skip
        _tar(root / f"{s:05d}.tar", members)
        pq.write_table(pa.table({"key": ["x"], "status": ["success"]}), root / f"{s:05d}.parquet")
        (root / f"{s:05d}_stats.json").write_text("{}")
    return root


BAD_TAR = [
    ("000000001.jpg", _img(1)), ("000000001.txt", b"a good sample"), ("000000001.json", b'{"ok": 1}'),
    ("000000002.jpg", b"\xff\xd8\xff corrupt jpeg bytes"), ("000000002.txt", b"corrupt image"),
    ("000000003.jpg", _img(3)), ("000000003.txt", b""),
    ("000000004.jpg", _img(4)), ("000000004.txt", b"caf\xe9 latin-1"),
    ("000000005.json", b'{"lonely": true}'),
    ("000000006.jpg", _img(6)),
    ("000000007.txt", b"no image"),
    ("000000008.jpg", _img(8)), ("000000008.txt", b"bad json"), ("000000008.json", b"{nope"),
    ("000000009.jpg", _img(9)),
    ("000000010.jpg", _img(10)), ("000000010.txt", b"between the parts of 9"),
    ("000000009.txt", b"ungrouped"),
    ("000000011.png", _img(11, "PNG")), ("000000011.txt", b"another good one"),
]  # fmt: skip
EXPECTED = {
    "undecodable_image": 1,
    "empty_caption": 1,
    "non_utf8_caption": 1,
    "orphan_member": 1,
    "missing_caption": 1,
    "missing_image": 1,
    "bad_json": 1,
    "ungrouped": 1,
}


def test_every_problem_is_counted_with_its_reason(tmp_path):
    _tar(tmp_path / "00000.tar", BAD_TAR)
    report = validate_dataset(tmp_path)
    assert report.format == "webdataset" and report.ok
    assert report.good == 3  # 1, 10, 11
    assert report.problems == EXPECTED
    assert report.bad == 8
    [shard] = report.shards
    assert shard.examples["ungrouped"] == ["000000009"]
    assert shard.examples["undecodable_image"] == ["000000002"]
    table = report.table()
    assert "00000.tar" in table and "ungrouped" in table and table.endswith("OK")


def test_iter_shard_leaves_image_decoding_to_validate(tmp_path):
    _tar(tmp_path / "00000.tar", BAD_TAR)
    keys = [s.key for s in iter_shard(tmp_path / "00000.tar") if not hasattr(s, "reason")]
    assert "000000002" in keys  # structurally fine; the corrupt bytes are validate's finding
    assert validate_dataset(tmp_path, decode=False).good == 4


def _cut_inside(path, member: str, into: int = 10) -> int:
    """Cut the tar at `path` `into` bytes into the data of `member`; returns the new size."""
    with tarfile.open(path) as tf:
        cut = tf.getmember(member).offset_data + into
    path.write_bytes(path.read_bytes()[:cut])
    return cut


def test_truncated_shard_counts_its_intact_samples_and_fails_ok(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=8) as w:
        for i in range(16):
            w.write(f"{i:03d}", _img(i, "PNG"), f"sample {i}")
    w.finish()
    cut = _cut_inside(tmp_path / "00001.tar", "013.png")  # shard 2 holds 008..015: 5 intact before the cut
    report = validate_dataset(tmp_path)
    assert not report.ok and report.unreadable == []
    assert report.good == 8 + 5 and report.bad == 1 and report.problems == {"truncated_shard": 1}
    first, second = report.shards
    assert (first.good, first.truncated, second.good) == (8, None, 5)
    assert second.truncated == f"cut at byte {cut}, inside member 013.png"
    assert second.examples == {"truncated_shard": ["013"]}
    assert report.truncated == [("00001.tar", second.truncated)]
    assert report.mismatches == ["00001.tar: manifest says 8 samples, 5 intact before the cut"]
    assert report.to_dict()["truncated"] == [{"path": "00001.tar", "detail": second.truncated}]
    lines = report.table().splitlines()
    assert lines[1].split() == ["shard", "good", "truncated_shard", "status"]
    assert lines[3].split()[:4] == ["00001.tar", "5", "1", "truncated:"] and "013.png" in lines[3]
    assert lines[4].split() == ["TOTAL", "13", "1", "1", "truncated"]
    assert lines[-1].startswith("NOT OK: 1 truncated shard") and "used in training" in lines[-1]


def test_unreadable_shard_is_reported_with_its_path_and_fails_ok(tmp_path):
    _tar(tmp_path / "00000.tar", BAD_TAR[:3])
    _tar(tmp_path / "00001.tar", BAD_TAR[:6])
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:200])  # inside the first header: nothing to salvage
    report = validate_dataset(tmp_path)
    assert not report.ok and report.truncated == []
    assert report.good == 1
    assert report.problems["unreadable_shard"] == 1
    [(path, error)] = report.unreadable
    assert path == "00001.tar" and "truncated or not a tar" in error
    assert report.to_dict()["unreadable"] == [{"path": "00001.tar", "error": error}]
    table = report.table()
    assert f"unreadable: {error}" in table and "NOT OK: 1 unreadable shard" in table


def test_truncated_parquet_shard_is_unreadable_and_named(tmp_path):
    with ShardWriter(tmp_path, fmt="parquet", samples_per_shard=4) as w:
        for i in range(8):
            w.write(f"{i:03d}", _img(i), f"sample {i}")
    w.finish()
    data = (tmp_path / "00001.parquet").read_bytes()
    (tmp_path / "00001.parquet").write_bytes(data[: len(data) // 2])
    report = validate_dataset(tmp_path)
    assert not report.ok and report.good == 4 and report.truncated == []
    [(path, error)] = report.unreadable
    assert path == "00001.parquet" and "truncated (no footer)" in error


def test_clean_dataset_with_manifest_validates_and_tampering_is_noticed(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=2) as w:
        for i in range(5):
            w.write(f"{i:03d}", _img(i, "PNG"), f"sample {i}")
    w.finish()
    report = validate_dataset(tmp_path)
    assert report.ok and report.good == 5 and report.problems == {} and report.mismatches == []
    _tar(tmp_path / "00001.tar", [("x.png", _img(1, "PNG")), ("x.txt", b"replaced")])
    report = validate_dataset(tmp_path)
    assert report.ok and len(report.mismatches) == 2  # sample count and sha256 of 00001.tar
    (tmp_path / "00002.tar").unlink()
    report = validate_dataset(tmp_path)
    assert not report.ok and report.unreadable == [("00002.tar", "missing")]


def test_invalid_manifest_makes_the_report_not_ok(tmp_path):
    _tar(tmp_path / "00000.tar", BAD_TAR[:3])
    (tmp_path / MANIFEST_NAME).write_text("{}")
    report = validate_dataset(tmp_path)
    assert not report.ok and report.manifest_error and report.good == 1


def test_index_foreign_img2dataset_output(tmp_path):
    root = _img2dataset_dir(tmp_path / "laion", shards=2, per_shard=4)
    m = index_dataset(root)
    assert m == Manifest.load(root)
    assert (m.format, m.source, m.image_field, m.caption_field) == ("webdataset", "index", "jpg", "txt")
    assert [s.path for s in m.shards] == ["00000.tar", "00001.tar"]  # tars win over the metadata parquet
    assert m.num_samples == 8 and all(s.sha256 == sha256_file(root / s.path) for s in m.shards)
    report = validate_dataset(root)
    assert report.ok and report.good == 8 and report.mismatches == []
    first = next(iter_shard(m.shard_paths(root)[0], image_field=m.image_field))
    assert first.key == "000000000" and first.meta == {"key": "000000000", "status": "success"}


def test_index_counts_only_good_samples_keeps_extra_and_detects_mixed_extensions(tmp_path):
    _tar(tmp_path / "00000.tar", BAD_TAR)
    m = index_dataset(tmp_path, source="web")
    assert m.num_samples == 3 and m.image_field == "auto"  # jpg and png members
    assert m.extra["index"]["problems"] == EXPECTED
    m.model_copy(update={"extra": {"note": "kept"}}).save(tmp_path)
    assert index_dataset(tmp_path).extra["note"] == "kept"


def test_index_refuses_unreadable_shards_unless_told_to_skip(tmp_path):
    root = _img2dataset_dir(tmp_path / "d", shards=3, per_shard=3)
    data = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(data[:300])
    _cut_inside(root / "00002.tar", "000020002.txt", into=3)
    with pytest.raises(ShardError) as err:
        index_dataset(root)
    assert err.value.path == root / "00001.tar"
    (root / "00001.tar").write_bytes(data)
    with pytest.raises(ShardError, match="truncated .*2 intact samples .*--skip-unreadable") as err:
        index_dataset(root)  # a truncated shard is refused too: a manifest records shards as complete
    assert err.value.path == root / "00002.tar"
    m = index_dataset(root, skip_unreadable=True)
    assert [s.path for s in m.shards] == ["00000.tar", "00001.tar"]
    assert m.extra["index"]["skipped"] == ["00002.tar"]
    assert m.extra["index"]["problems"] == {}  # the shard left out is not counted as bad samples


def test_parquet_dataset_validate_and_index(tmp_path):
    table = pa.table(
        {
            "key": ["a", "b", "c"],
            "jpg": [_img(1), b"garbage", _img(3)],
            "caption": ["one", "two", " "],
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    report = validate_dataset(tmp_path)
    assert report.format == "parquet" and report.good == 1
    assert report.problems == {"undecodable_image": 1, "empty_caption": 1}
    m = index_dataset(tmp_path)
    assert (m.format, m.image_field, m.caption_field, m.num_samples) == ("parquet", "jpg", "caption", 1)


def test_missing_directory_or_no_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate_dataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no shards"):
        index_dataset(tmp_path)
