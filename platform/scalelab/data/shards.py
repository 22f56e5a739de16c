"""Shard files: write WebDataset tars / Parquet files in the img2dataset layout, and read them back.

Writers validate every sample (unique key, non-empty UTF-8 caption, image Pillow can decode) and raise
ValueError, so a dataset written here never holds a bad sample. Tars are written with fixed member
metadata (mtime 0, uid/gid 0, no user names) and parquet with fixed options, so writing the same
samples twice gives byte-identical shards and the same manifest hash. A shard is written under a
temporary name and renamed when complete: a crashed writer leaves no half shard behind a real name.

The reader (`iter_shard`) accepts foreign img2dataset output as it is: `.jpg/.jpeg/.png/.webp` images,
an optional `{key}.json` member, keys with path-like prefixes. It yields `RawSample` for good samples
and `BadSample(key, reason)` for structural problems; it does not decode images (validate does). A
shard it cannot read at all raises `ShardError(path, reason)`; a truncated tar yields its intact
samples, then `BadSample(key, TRUNCATED, detail)` (see `scalelab.data.shard_reader`).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from scalelab.data.manifest import Format, Manifest, ShardInfo, sha256_file
from scalelab.data.shard_reader import (
    BAD_REASONS,
    IMAGE_EXTS,
    PARQUET_CAPTION_COLUMNS,
    PARQUET_IMAGE_COLUMNS,
    SHARD_SUFFIX,
    TRUNCATED,
    BadSample,
    RawSample,
    ShardError,
    iter_shard,
    shard_format,
    split_member_name,
    tar_member_names,
)

__all__ = [
    "BAD_REASONS",
    "IMAGE_EXTS",
    "PARQUET_CAPTION_COLUMNS",
    "PARQUET_IMAGE_COLUMNS",
    "TRUNCATED",
    "BadSample",
    "RawSample",
    "ShardError",
    "ShardInfo",
    "ShardWriter",
    "finish_dataset",
    "iter_shard",
    "shard_format",
    "split_member_name",
    "tar_member_names",
]

_PIL_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
# A checked sample on its way to disk: key, image, caption (UTF-8), meta (JSON) or None.
_Row = tuple[str, bytes, bytes, bytes | None]


# --------------------------------------------------------------------------- writing
def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    # WebDataset splits a member name at the first dot of its base name: a dot in a key would move it.
    bad = [c for c in (".", "\\", "\n", "\r", "\0") if c in key]
    if bad or key.startswith("/") or key.endswith("/") or key != key.strip():
        raise ValueError(
            f"sample key {key!r} may not contain dots, backslashes, control characters, "
            "surrounding spaces or leading/trailing slashes"
        )
    return key


def _check_caption(caption: object, key: str) -> bytes:
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"sample {key!r}: caption is not valid UTF-8") from None
    if not isinstance(caption, str):
        raise ValueError(f"sample {key!r}: caption must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise ValueError(f"sample {key!r}: caption is empty")
    try:
        return caption.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"sample {key!r}: caption cannot be encoded as UTF-8") from None


def _check_image(image: object, key: str, expect_ext: str | None) -> bytes:
    if not isinstance(image, bytes | bytearray | memoryview) or not len(image):
        raise ValueError(f"sample {key!r}: image must be non-empty bytes")
    image = bytes(image)
    try:
        with Image.open(io.BytesIO(image)) as img:
            img.load()
            found = img.format
    except Exception as err:  # Pillow raises many types for bad bytes
        raise ValueError(f"sample {key!r}: image bytes cannot be decoded ({err})") from None
    if expect_ext is not None and found != _PIL_FORMAT[expect_ext]:
        raise ValueError(f"sample {key!r}: image is {found} but the shard extension is .{expect_ext}")
    return image


def _check_meta(meta: object, key: str) -> bytes | None:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise ValueError(f"sample {key!r}: meta must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"sample {key!r}: meta is not JSON-serialisable ({err})") from None


class ShardWriter:
    """Write samples into numbered shards of `samples_per_shard`; `close()` returns their ShardInfo.

    Parallel writers into one directory take disjoint `start_shard` ranges; then one `finish_dataset`
    call writes the manifest. A single writer can call `finish()` to do both.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        fmt: Format = "webdataset",
        samples_per_shard: int = 1000,
        source: str = "unknown",
        start_shard: int = 0,
        image_ext: str = "png",
        extra: dict[str, Any] | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
    ) -> None:
        if fmt not in SHARD_SUFFIX:
            raise ValueError(f"fmt must be one of {sorted(SHARD_SUFFIX)}, got {fmt!r}")
        if samples_per_shard <= 0 or start_shard < 0:
            raise ValueError("samples_per_shard must be > 0 and start_shard >= 0")
        if image_ext not in IMAGE_EXTS:
            raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.fmt: Format = fmt
        self.samples_per_shard = samples_per_shard
        self.source = source
        self.image_ext = image_ext
        self.extra = dict(extra or {})
        self.image_column = image_column
        self.caption_column = caption_column
        self._next_shard = start_shard
        self._keys: set[str] = set()
        self._rows: list[_Row] = []  # parquet: rows of the open shard (a table is written whole)
        self._tar: tarfile.TarFile | None = None  # webdataset: the open shard, streamed member by member
        self._count = 0  # samples in the open shard
        self._done: list[ShardInfo] = []
        self._closed = False

    @property
    def image_field(self) -> str:
        return self.image_ext if self.fmt == "webdataset" else self.image_column

    @property
    def caption_field(self) -> str:
        return "txt" if self.fmt == "webdataset" else self.caption_column

    def write(self, key: str, image: bytes, caption: str, meta: dict[str, Any] | None = None) -> None:
        """Validate one sample and add it; a full shard is written out immediately."""
        if self._closed:
            raise ValueError("write() after close()")
        key = _check_key(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} was already written")
        row = (
            key,
            _check_image(image, key, self.image_ext if self.fmt == "webdataset" else None),
            _check_caption(caption, key),
            _check_meta(meta, key),
        )
        self._keys.add(key)
        if self.fmt == "webdataset":
            if self._tar is None:
                self._tar = tarfile.open(self._tmp_path(), "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
            _add_sample(self._tar, row, self.image_ext)
        else:
            self._rows.append(row)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._flush()

    def _tmp_path(self) -> Path:
        return self.out_dir / f"{self._next_shard:05d}{SHARD_SUFFIX[self.fmt]}.tmp"

    def _flush(self) -> None:
        if not self._count:
            return
        tmp = self._tmp_path()
        final, name = tmp.with_suffix(""), tmp.with_suffix("").name
        try:
            if self._tar is not None:
                self._tar.close()
                self._tar = None
            else:
                _write_parquet(tmp, self._rows, self.image_column, self.caption_column)
            tmp.replace(final)
        finally:
            tmp.unlink(missing_ok=True)
        self._done.append(
            ShardInfo(path=name, samples=self._count, bytes=final.stat().st_size, sha256=sha256_file(final))
        )
        self._rows, self._count = [], 0
        self._next_shard += 1

    def close(self) -> list[ShardInfo]:
        """Write the last partial shard; returns every shard this writer wrote (idempotent)."""
        if not self._closed:
            self._flush()
            self._closed = True
        return list(self._done)

    def finish(self) -> Manifest:
        """close() and write manifest.json for this writer's shards alone."""
        return finish_dataset(
            self.out_dir,
            self.close(),
            fmt=self.fmt,
            source=self.source,
            image_field=self.image_field,
            caption_field=self.caption_field,
            extra=self.extra,
        )

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:  # keep completed shards, drop the half-filled one
            if self._tar is not None:
                self._tar.close()
                self._tar = None
            self._tmp_path().unlink(missing_ok=True)
            self._rows, self._count, self._closed = [], 0, True


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: same samples -> same bytes -> same hash
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _add_sample(tf: tarfile.TarFile, row: _Row, image_ext: str) -> None:
    key, image, caption, meta = row  # members of one key adjacent (grouped by key)
    tf.addfile(*_tar_member(f"{key}.{image_ext}", image))
    tf.addfile(*_tar_member(f"{key}.txt", caption))
    if meta is not None:
        tf.addfile(*_tar_member(f"{key}.json", meta))


def _write_parquet(path: Path, rows: list[_Row], image_col: str, caption_col: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": pa.array([r[0] for r in rows], pa.string()),
            image_col: pa.array([r[1] for r in rows], pa.binary()),
            caption_col: pa.array([r[2].decode("utf-8") for r in rows], pa.string()),
            "json": pa.array([None if r[3] is None else r[3].decode("utf-8") for r in rows], pa.string()),
        }
    )
    # Images are already compressed; no statistics keeps the footer free of per-run noise.
    pq.write_table(table, path, compression="snappy", write_statistics=False)


def finish_dataset(
    out_dir: str | Path,
    shards: list[ShardInfo],
    *,
    fmt: Format,
    source: str,
    image_field: str,
    caption_field: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write manifest.json over `shards` (from one or several writers), sorted by shard path.

    `caption_field` defaults to 'txt' for tars and 'caption' for parquet.
    """
    out_dir = Path(out_dir)
    missing = [s.path for s in shards if not (out_dir / s.path).is_file()]
    if missing:
        raise ValueError(f"shards missing from {out_dir}: {missing[:5]}")
    if caption_field is None:
        caption_field = "txt" if fmt == "webdataset" else "caption"
    manifest = Manifest.build(
        fmt=fmt,
        source=source,
        image_field=image_field,
        caption_field=caption_field,
        shards=shards,
        extra=extra,
    )
    manifest.save(out_dir)
    return manifest


