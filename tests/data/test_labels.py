"""Labels → text: ImageFolder exporters (sklearn digits, Fashion-MNIST) and from_labels captions."""

import gzip
import io
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scalelab.data.labels import (
    DIGIT_NAMES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_NAMES,
    export_digits,
    export_fashion_mnist,
    from_labels,
    read_templates,
)
from scalelab.data.shards import RawSample, iter_shard
from scalelab.data.validate import validate_dataset


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return export_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def few_digits(digits, tmp_path_factory) -> Path:
    """The first 15 images of each digit, with the same classnames.txt and templates.txt."""
    root = tmp_path_factory.mktemp("few_digits")
    for path in [
        *digits.glob("*.txt"),
        *(p for d in range(10) for p in sorted(digits.glob(f"{d}/*.png"))[:15]),
    ]:
        dest = root / path.relative_to(digits)
        dest.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, dest)
    return root


def _samples(out: Path) -> list[RawSample]:
    return [s for p in sorted(out.glob("*.tar")) for s in iter_shard(p)]


def test_export_digits_writes_an_image_folder(digits):
    files = sorted(digits.glob("*/*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in digits.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    assert (digits / "classnames.txt").read_text().split("\n")[:10] == list(DIGIT_NAMES)
    assert read_templates(digits / "templates.txt")
    with Image.open(files[0]) as img:
        assert (img.mode, img.size) == ("L", (8, 8))
    values = np.stack([np.asarray(Image.open(p)) for p in files[:200]])
    assert values.max() == 255 and values.min() == 0  # 0–16 scaled to 0–255


def test_from_labels_on_digits_captions_name_the_class(digits, tmp_path):
    m = from_labels(digits, tmp_path / "a", templates=digits / "templates.txt", seed=3, samples_per_shard=500)
    assert m.num_samples == 1797 and [s.samples for s in m.shards] == [500, 500, 500, 297]
    assert m.source == "labels:" + digits.name and m.image_field == "png"
    assert m.extra["classnames"] == list(DIGIT_NAMES) and m.extra["seed"] == 3
    samples = _samples(tmp_path / "a")
    for s in samples[:300]:
        label = int(s.key[:4])
        assert DIGIT_NAMES[label] in s.caption and s.meta["label"] == label
        assert s.meta["file"].startswith(f"{label}/")
    assert len({s.caption for s in samples}) > 20  # several templates used
    first_shard_labels = {s.meta["label"] for s in samples[:500]}
    assert first_shard_labels == set(range(10))  # shuffled: a shard subset sees every class


def test_from_labels_is_deterministic_for_a_seed(few_digits, tmp_path):
    kw = dict(templates=few_digits / "templates.txt", samples_per_shard=40)
    a = from_labels(few_digits, tmp_path / "a", seed=7, **kw)
    b = from_labels(few_digits, tmp_path / "b", seed=7, **kw)
    c = from_labels(few_digits, tmp_path / "c", seed=8, **kw)
    assert a.num_samples == 150 and len(a.shards) == 4
    assert a.content_hash == b.content_hash != c.content_hash
    assert {s.key for s in _samples(tmp_path / "a")} == {s.key for s in _samples(tmp_path / "c")}


def _tree(root: Path, spec: dict[str, list[str]]) -> Path:
    for folder, files in spec.items():
        (root / folder).mkdir(parents=True)
        for i, name in enumerate(files):
            fmt = {"png": "PNG", "jpg": "JPEG"}[name.rsplit(".", 1)[1]]
            Image.new("RGB", (16, 16), (30 * i, 100, 50)).save(root / folder / name, fmt)
    return root


def test_from_labels_folder_names_template_list_and_mixed_formats(tmp_path):
    root = _tree(tmp_path / "pets", {"golden_retriever": ["1.png", "2.png"], "tabby_cat": ["a.jpg", "b.png"]})
    m = from_labels(root, tmp_path / "out", templates=["a photo of a {c}.", "a {c}, a type of pet."], seed=0)
    assert m.extra["classnames"] == ["golden retriever", "tabby cat"] and m.image_field == "png"
    assert validate_dataset(tmp_path / "out").good == 4  # the jpg was re-encoded as png
    captions = {s.meta["class"]: s.caption for s in _samples(tmp_path / "out")}
    assert set(captions) == {"golden retriever", "tabby cat"}
    named = from_labels(root, tmp_path / "named", templates=["{c}"], classnames=["dog", "cat"])
    assert sorted(s.caption for s in _samples(tmp_path / "named")) == ["cat", "cat", "dog", "dog"]
    assert named.extra["templates"] == ["{c}"]


@pytest.mark.parametrize("templates", [["a photo."], ["a {c} and a {x}"], [], ["{0} {c}"]])
def test_bad_templates_are_refused(tmp_path, templates):
    root = _tree(tmp_path / "t", {"x": ["1.png"]})
    with pytest.raises(ValueError):
        from_labels(root, tmp_path / "out", templates=templates)


def test_from_labels_refusals(tmp_path, digits):
    root = _tree(tmp_path / "t", {"x": ["1.png"], "y": ["2.png"]})
    with pytest.raises(ValueError, match="2 class folders"):
        from_labels(root, tmp_path / "o1", templates=["{c}"], classnames=["only one"])
    from_labels(root, tmp_path / "o2", templates=["{c}"])
    with pytest.raises(ValueError, match="already holds a dataset"):
        from_labels(root, tmp_path / "o2", templates=["{c}"])
    with pytest.raises(FileNotFoundError):
        from_labels(tmp_path / "missing", tmp_path / "o3", templates=["{c}"])


def _fake_idx(root: Path, n: int, compress: bool) -> Path:
    root.mkdir(parents=True)
    images = (np.arange(n * 28 * 28) % 256).astype(np.uint8).reshape(n, 28, 28)
    labels = (np.arange(n) % 10).astype(np.uint8)
    opener = gzip.open if compress else open
    suffix = ".gz" if compress else ""
    with opener(root / f"t10k-images-idx3-ubyte{suffix}", "wb") as fh:
        fh.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    with opener(root / f"t10k-labels-idx1-ubyte{suffix}", "wb") as fh:
        fh.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


@pytest.mark.parametrize("compress", [True, False])
def test_export_fashion_mnist_reads_idx_files_gzipped_or_not(tmp_path, compress):
    src = _fake_idx(tmp_path / "src", 12, compress)
    out = export_fashion_mnist(tmp_path / "out", source_dir=src, split="test", limit=5)
    files = sorted(out.glob("*/*.png"))
    assert [p.parent.name for p in files] == ["0", "1", "2", "3", "4"]
    assert np.asarray(Image.open(files[1])).tobytes() == bytes(i % 256 for i in range(784, 2 * 784))


def test_export_fashion_mnist_missing_source_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        export_fashion_mnist(tmp_path / "out", source_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        export_fashion_mnist(tmp_path / "out", split="val")


def test_export_fashion_mnist_from_the_debian_package(tmp_path):
    if not Path(FASHION_MNIST_DIR).is_dir():
        msg = f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    out = export_fashion_mnist(tmp_path / "fm", split="train", limit=50)
    files = sorted(out.glob("*/*.png"))
    assert len(files) == 50
    with Image.open(files[0]) as img:
        assert (img.mode, img.size) == ("L", (28, 28))
    assert (out / "classnames.txt").read_text().splitlines() == list(FASHION_MNIST_NAMES)
    m = from_labels(out, tmp_path / "pairs", templates=out / "templates.txt", seed=0)
    samples = _samples(tmp_path / "pairs")
    assert m.num_samples == 50 and all(FASHION_MNIST_NAMES[s.meta["label"]] in s.caption for s in samples)
    assert Image.open(io.BytesIO(samples[0].image)).size == (28, 28)
