"""`scalelab data …` handlers, through a parser built with add_data_commands as the main CLI does."""

import argparse
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from scalelab.data.cli import add_data_commands
from scalelab.data.labels import FASHION_MNIST_DIR
from scalelab.data.manifest import Manifest


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="scalelab")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def _foreign_tar(path, n=3):
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i, 0, 0)).save(buf, "JPEG")
            for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"alt {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_export_from_labels_validate(tmp_path, capsys):
    assert _run("export-digits", str(tmp_path / "digits")) == 0
    for png in sorted((tmp_path / "digits").glob("*/*.png"))[::2]:  # keep it quick: 898 images
        png.unlink()
    argv = ["from-labels", str(tmp_path / "digits"), str(tmp_path / "pairs"), "--seed", "1"]
    assert _run(*argv, "--samples-per-shard", "500") == 0
    assert "898 pairs in 2 shards" in capsys.readouterr().out
    assert _run("validate", str(tmp_path / "pairs")) == 0
    out = capsys.readouterr().out
    assert "00001.tar" in out and "TOTAL" in out and "898" in out
    assert _run("validate", "--json", "--no-decode", str(tmp_path / "pairs")) == 0
    assert json.loads(capsys.readouterr().out)["good"] == 898


def test_index_then_validate_and_an_unreadable_shard_exits_1(tmp_path, capsys):
    _foreign_tar(tmp_path / "00000.tar")
    _foreign_tar(tmp_path / "00001.tar")
    assert _run("index", str(tmp_path), "--source", "web") == 0
    assert "2 shards, 6 good samples" in capsys.readouterr().out
    assert Manifest.load(tmp_path).source == "web"
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:1000])
    assert _run("validate", str(tmp_path)) == 1
    assert "00001.tar" in capsys.readouterr().out
    assert _run("index", str(tmp_path)) == 2
    assert "00001.tar" in capsys.readouterr().err
    assert _run("index", "--skip-unreadable", str(tmp_path)) == 0
    assert "shards left out (unreadable or truncated): 00001.tar" in capsys.readouterr().out


def test_validate_reports_a_truncated_shard_and_its_intact_samples(tmp_path, capsys):
    _foreign_tar(tmp_path / "00000.tar", n=4)
    _foreign_tar(tmp_path / "00001.tar", n=4)
    with tarfile.open(tmp_path / "00001.tar") as tf:
        cut = tf.getmember("000000003.jpg").offset_data + 100
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:cut])
    assert _run("validate", str(tmp_path)) == 1  # a damaged file fails validate, as an unreadable one does
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("00001.tar"))
    assert row.split()[:4] == ["00001.tar", "3", "1", "truncated:"]
    assert f"cut at byte {cut}, inside member 000000003.jpg" in row
    total = next(line for line in out.splitlines() if line.startswith("TOTAL"))
    assert total.split()[:2] == ["TOTAL", "7"] and "NOT OK: 1 truncated shard" in out
    assert _run("validate", "--json", str(tmp_path)) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["good"] == 7 and report["problems"] == {"truncated_shard": 1}
    assert report["truncated"] == [{"path": "00001.tar", "detail": row.split("truncated: ")[1]}]


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert _run("export-fashion-mnist", str(tmp_path / "fm"), "--source-dir", str(tmp_path / "none")) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    (tmp_path / "folder" / "a").mkdir(parents=True)
    assert _run("from-labels", str(tmp_path / "folder"), str(tmp_path / "out")) == 2
    assert "no images" in capsys.readouterr().err
    assert _run("validate", str(tmp_path / "missing")) == 2


def test_fashion_mnist_export_with_limit(tmp_path):
    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("dataset-fashion-mnist is not installed (test_labels fails on CI for it)")
    assert _run("export-fashion-mnist", str(tmp_path / "fm"), "--split", "test", "--limit", "20") == 0
    assert len(list((tmp_path / "fm").glob("*/*.png"))) == 20


def test_data_needs_a_subcommand():
    with pytest.raises(SystemExit):
        _run()


def test_from_labels_without_templates_uses_clips_default_prompt_and_keeps_the_labels(tmp_path, capsys):
    """An ImageFolder tree with no templates.txt (e.g. for `task: classify`, which reads only the labels)."""
    from scalelab.data.shards import iter_shard

    assert _run("export-digits", str(tmp_path / "digits")) == 0
    for png in sorted((tmp_path / "digits").glob("*/*.png"))[::10]:
        png.unlink()
    (tmp_path / "digits" / "templates.txt").unlink(missing_ok=True)
    assert _run("from-labels", str(tmp_path / "digits"), str(tmp_path / "pairs")) == 0
    assert "every caption is 'a photo of a {}.'" in capsys.readouterr().out
    manifest = Manifest.load(tmp_path / "pairs")
    samples = list(iter_shard(tmp_path / "pairs" / manifest.shards[0].path))
    folders = sorted(p.name for p in (tmp_path / "digits").iterdir() if p.is_dir())
    for sample in samples[:20]:
        label = sample.meta["label"]
        assert sample.caption == f"a photo of a {manifest.extra['classnames'][label]}."
        assert 0 <= label < len(folders)
    assert _run("from-labels", str(tmp_path / "digits"), str(tmp_path / "other"), "--templates",
                str(tmp_path / "nope.txt")) == 2
