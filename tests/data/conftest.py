"""Tiny image-text sources shared by the plan tests (no Ray) and the pipeline tests (Ray): 32 px PNGs
of a coloured square, captions naming its colour, written as WebDataset shards with a manifest."""

import io
from pathlib import Path

import pytest
from PIL import Image

from scalelab.config import DataConfig, DataSourceConfig
from scalelab.data.shards import ShardWriter
from scalelab.data.tokenizer import train_tokenizer

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 220, 40)}


def png(i: int, size: int = 32) -> bytes:
    name = list(COLORS)[i % len(COLORS)]
    img = Image.new("RGB", (size + i % 7, size), (i % 256, 128, 255 - i % 256))
    img.paste(COLORS[name], (4, 4, size // 2 + i % 5, size // 2))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def caption(i: int) -> str:
    return f"a {list(COLORS)[i % len(COLORS)]} square number {i}"


def write_source(out: Path, prefix: str, shards: int, per_shard: int = 40) -> Path:
    with ShardWriter(out, samples_per_shard=per_shard, source=prefix) as w:
        for i in range(shards * per_shard):
            w.write(f"{prefix}{i:06d}", png(i), caption(i))
    w.finish()
    return out


def data_cfg(paths, weights=None, **kw) -> DataConfig:
    weights = weights or [1.0] * len(paths)
    kw.setdefault("decode_batch_size", 16)
    kw.setdefault("context_length", 16)
    return DataConfig(
        sources=[DataSourceConfig(path=str(p), weight=w) for p, w in zip(paths, weights)],
        image_size=32,
        **kw,
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(a, b): 3 shards x 40 pairs and 2 shards x 40 pairs; a/tokenizer.json trained on both."""
    root = tmp_path_factory.mktemp("pipe")
    a = write_source(root / "a", "a", 3)  # 120 pairs
    b = write_source(root / "b", "b", 2)  # 80 pairs
    train_tokenizer([a, b], kind="bpe", vocab_size=200)  # -> a/tokenizer.json
    return a, b
