"""Labelled images → image-text pairs, as BASIC turned JFT labels into text with prompt templates.

`from_labels` reads an ImageFolder tree (one sub-folder per class; an optional `classnames.txt` at the
root names the classes, one line per folder in sorted folder order) and writes captioned shards:
each image gets one template drawn at random (seeded) and filled with its class name (templates in
either convention, `{}` or `{c}`, and class names from classnames.txt or the folder names: the rules of
`scalelab.data.prompts`, shared with evaluation). Sample order is shuffled with the same seed
so that the data axis, which takes the first shards, sees every class.

Exporters write small labelled sets as ImageFolder trees of PNG files, with classnames.txt and a
templates.txt: scikit-learn's digits (bundled with scikit-learn) and Fashion-MNIST (from the idx
files Debian's `dataset-fashion-mnist` package installs).
"""

from __future__ import annotations

import gzip
import io
import random
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scalelab.data.manifest import Format, Manifest
from scalelab.data.prompts import (
    CLASSNAMES_FILE,
    TEMPLATES_FILE,
    class_folders,
    fill_template,
    read_classnames,
    read_templates,
    resolve_classnames,
)
from scalelab.data.shards import IMAGE_EXTS, ShardWriter

__all__ = [
    "CLASSNAMES_FILE",
    "DIGIT_NAMES",
    "DIGIT_TEMPLATES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_NAMES",
    "FASHION_MNIST_TEMPLATES",
    "TEMPLATES_FILE",
    "export_digits",
    "export_fashion_mnist",
    "from_labels",
    "read_classnames",
    "read_templates",
]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the number {c}.",
    "a handwritten digit {c}.",
    "a low resolution image of the digit {c}.",
    "a blurry photo of a handwritten {c}.",
    "the number {c}, written by hand.",
)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_TEMPLATES = (
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a product photo of a {c}, a type of clothing.",
    "a grayscale picture of the {c}.",
)
_PIL_SAVE = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


# --------------------------------------------------------------------------- ImageFolder -> pairs
def _class_folders(root: Path, classnames: list[str] | None) -> tuple[list[Path], list[str]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    folders = class_folders(root)
    if not folders:
        raise ValueError(f"{root} has no class sub-folders")
    return folders, resolve_classnames(root, folders, classnames)


def _write_text(path: Path, lines: list[str] | tuple[str, ...]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)


def _ext(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def _image_bytes(path: Path, ext: str) -> bytes:
    """The file's bytes, re-encoded only when its type differs from the dataset's image extension."""
    if _ext(path) == ext or {_ext(path), ext} == {"jpg", "jpeg"}:
        return path.read_bytes()
    with Image.open(path) as img:
        img = img.convert("RGB") if ext in ("jpg", "jpeg") and img.mode not in ("RGB", "L") else img
        buf = io.BytesIO()
        img.save(buf, _PIL_SAVE[ext])
        return buf.getvalue()


def from_labels(
    image_folder: str | Path,
    out_dir: str | Path,
    *,
    templates: list[str] | tuple[str, ...] | str | Path,
    seed: int = 0,
    samples_per_shard: int = 1000,
    classnames: list[str] | None = None,
    fmt: Format = "webdataset",
) -> Manifest:
    """Write captioned shards from an ImageFolder tree; returns the manifest (see module doc).

    Keys (`{class index:04d}_{file index:06d}`, files in sorted order) depend only on the tree; the
    seed picks the templates and the sample order. Each sample's json holds its label and source file.
    """
    root, out = Path(image_folder), Path(out_dir)
    prompts = read_templates(templates)
    folders, names = _class_folders(root, classnames)
    items = [(ci, fi, path) for ci, folder in enumerate(folders) for fi, path in enumerate(_images(folder))]
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) in the class folders of {root}")
    if (out / "manifest.json").exists() or any(out.glob("*.tar")) or any(out.glob("*.parquet")):
        raise ValueError(f"{out} already holds a dataset; choose an empty directory")
    rng = random.Random(seed)
    choices = [rng.randrange(len(prompts)) for _ in items]
    order = list(range(len(items)))
    rng.shuffle(order)
    ext = Counter(_ext(p) for _, _, p in items).most_common(1)[0][0]
    extra: dict[str, Any] = {
        "classnames": names,
        "templates": prompts,
        "folders": [f.name for f in folders],
        "seed": seed,
        "image_folder": str(root),
    }
    source = f"labels:{root.name}"
    writer = ShardWriter(
        out, fmt=fmt, samples_per_shard=samples_per_shard, source=source, image_ext=ext, extra=extra
    )
    with writer:
        for i in order:
            ci, fi, path = items[i]
            caption = fill_template(prompts[choices[i]], names[ci])
            meta = {
                "label": ci,
                "class": names[ci],
                "template": choices[i],
                "file": str(path.relative_to(root)),
            }
            writer.write(f"{ci:04d}_{fi:06d}", _image_bytes(path, ext), caption, meta)
    return writer.finish()


# --------------------------------------------------------------------------- exporters
def _export_tree(
    out_dir: Path, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...], templates: tuple[str, ...]
) -> Path:
    """ImageFolder of grayscale PNGs: `{label}/{index:05d}.png`, plus classnames.txt and templates.txt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for ci in range(len(names)):
        (out_dir / str(ci)).mkdir(exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(  # 2-D uint8 -> mode "L"
            out_dir / str(int(label)) / f"{i:05d}.png"
        )
    # Folders "0".."9" sort the same as the labels, so line i of classnames.txt names folder i.
    _write_text(out_dir / CLASSNAMES_FILE, names)
    _write_text(out_dir / TEMPLATES_FILE, templates)
    return out_dir


def export_digits(out_dir: str | Path) -> Path:
    """scikit-learn's digits (1797 images, 8×8, values 0–16 scaled to 0–255) as an ImageFolder tree."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return _export_tree(Path(out_dir), images, digits.target, DIGIT_NAMES, DIGIT_TEMPLATES)


def _open_idx(source: Path, stem: str) -> io.BufferedIOBase:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return gzip.open(source / name, "rb") if name.endswith(".gz") else open(source / name, "rb")
    raise FileNotFoundError(
        f"{source / stem}(.gz) not found: install Debian's `{FASHION_MNIST_PACKAGE}` package "
        f"(apt-get install {FASHION_MNIST_PACKAGE}) or pass source_dir"
    )


def _read_idx(source: Path, stem: str, magic: int, limit: int | None) -> np.ndarray:
    """An idx file (big-endian header: magic, counts, dims; then uint8 data), first `limit` items."""
    with _open_idx(source, stem) as fh:
        ndim = magic & 0xFF
        header = fh.read(4 * (1 + ndim))
        got_magic, *dims = struct.unpack(f">{1 + ndim}I", header)
        if got_magic != magic:
            raise ValueError(f"{source / stem}: bad idx magic {got_magic:#x} (expected {magic:#x})")
        n = dims[0] if limit is None else min(limit, dims[0])
        count = n * int(np.prod(dims[1:], dtype=np.int64))
        data = fh.read(count)
        if len(data) != count:
            raise ValueError(f"{source / stem}: truncated ({len(data)} of {count} bytes)")
    return np.frombuffer(data, dtype=np.uint8).reshape(n, *dims[1:])


def export_fashion_mnist(
    out_dir: str | Path,
    *,
    source_dir: str | Path = FASHION_MNIST_DIR,
    split: str = "train",
    limit: int | None = None,
) -> Path:
    """Fashion-MNIST (28×28 grayscale, 10 classes) idx files → ImageFolder tree (first `limit` images)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    source = Path(source_dir)
    if not source.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory {source} does not exist: install Debian's `{FASHION_MNIST_PACKAGE}` "
            f"package (apt-get install {FASHION_MNIST_PACKAGE}) or pass source_dir"
        )
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(source, f"{prefix}-images-idx3-ubyte", 0x0803, limit)
    labels = _read_idx(source, f"{prefix}-labels-idx1-ubyte", 0x0801, limit)
    if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_MNIST_NAMES):
        raise ValueError(f"{source}: images and labels do not match")
    return _export_tree(Path(out_dir), images, labels, FASHION_MNIST_NAMES, FASHION_MNIST_TEMPLATES)
