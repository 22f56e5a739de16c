"""Reading shards: WebDataset tars and Parquet files in the img2dataset layout, as written anywhere.

`iter_shard` accepts foreign img2dataset output as it is: `.jpg/.jpeg/.png/.webp` images, an optional
`{key}.json` member, keys with path-like prefixes. It yields `RawSample` for good samples and
`BadSample(key, reason)` for structural problems; it does not decode images (validate does). A shard
it cannot read at all raises `ShardError(path, reason)`. The sample types live here; `shards.py`
(the writers) re-exports everything, so `scalelab.data.shards` stays the one import users need.

A truncated tar (a download or copy cut short) is read as far as it is intact, as WebDataset's
streaming reader does: every sample before the cut, then one `BadSample(key, TRUNCATED, detail)` for
the sample the cut went through (key "" when it fell between samples). A parquet file cut short has
lost its footer (schema and row-group offsets), so nothing in it can be located: it raises ShardError.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from scalelab.data.manifest import Format

__all__ = [
    "BAD_REASONS",
    "IMAGE_EXTS",
    "PARQUET_CAPTION_COLUMNS",
    "PARQUET_IMAGE_COLUMNS",
    "SHARD_SUFFIX",
    "TRUNCATED",
    "BadSample",
    "RawSample",
    "ShardError",
    "iter_shard",
    "shard_format",
    "split_member_name",
    "tar_member_names",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
TRUNCATED = "truncated_shard"  # the shard stops early: one item for the cut, see _split_cut_run
BAD_REASONS = frozenset(
    ("ungrouped", "undecodable_image", "missing_caption", "empty_caption", "non_utf8_caption",
     "missing_image", "orphan_member", "bad_json", TRUNCATED)
)  # fmt: skip
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
PARQUET_CAPTION_COLUMNS = ("caption", "txt")


class RawSample(NamedTuple):
    """A structurally good sample: image bytes (not yet decoded), caption, optional metadata."""

    key: str
    image: bytes
    caption: str
    meta: dict[str, Any] | None


class BadSample(NamedTuple):
    """A sample the reader had to drop; `reason` is one of BAD_REASONS; `detail` says where a
    truncated shard stops (reason TRUNCATED), empty otherwise."""

    key: str
    reason: str
    detail: str = ""


class ShardError(Exception):
    """A shard that cannot be read at all (not a tar, cut inside its first header, a parquet file
    without its footer, missing columns)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# --------------------------------------------------------------------------- reading
def shard_format(path: str | Path) -> Format:
    """'webdataset' for `.tar`, 'parquet' for `.parquet` (anything else is an error)."""
    suffix = Path(path).suffix.lower()
    for fmt, ext in SHARD_SUFFIX.items():
        if suffix == ext:
            return fmt  # type: ignore[return-value]
    raise ValueError(f"{path}: unknown shard type {suffix!r} (expected .tar or .parquet)")


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset rule: key = directory + base name up to its first dot; ext = the rest (lowercased)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


def iter_shard(
    path: str | Path,
    *,
    fmt: Format | None = None,
    image_field: str = "auto",
    caption_field: str | None = None,
) -> Iterator[RawSample | BadSample]:
    """Samples of one shard in file order; raises ShardError (while iterating) if it is unreadable.

    `fmt` defaults to the file suffix. `image_field` 'auto' takes any image extension (tar; a named
    extension is preferred, others still accepted) or the first of the image/jpg/jpeg/png/webp
    columns (parquet). `caption_field` defaults to 'txt' (tar) / 'caption' or 'txt' (parquet).
    """
    path = Path(path)
    fmt = fmt or shard_format(path)
    if fmt == "webdataset":
        return _iter_tar(path, image_field, caption_field or "txt")
    if fmt == "parquet":
        return _iter_parquet(path, image_field, caption_field or "auto")
    raise ValueError(f"unknown shard format {fmt!r}")


def _make_sample(
    key: str, image: bytes | None, caption: bytes | None, meta_raw: bytes | None
) -> RawSample | BadSample:
    """Classify one key's parts, structural problems first."""
    if image is None and caption is None:
        return BadSample(key, "orphan_member")
    if image is None:
        return BadSample(key, "missing_image")
    if caption is None:
        return BadSample(key, "missing_caption")
    if not image:
        return BadSample(key, "undecodable_image")
    try:
        text = caption.decode("utf-8")
    except UnicodeDecodeError:
        return BadSample(key, "non_utf8_caption")
    if not text.strip():
        return BadSample(key, "empty_caption")
    meta = None
    if meta_raw is not None:
        try:
            meta = json.loads(meta_raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return BadSample(key, "bad_json")
        if not isinstance(meta, dict):
            return BadSample(key, "bad_json")
    return RawSample(key, image, text, meta)


@dataclass(frozen=True)
class _TarScan:
    """A tar's member headers up to its end-of-archive marker, or up to where it stops early."""

    members: list[tarfile.TarInfo]
    size: int  # of the file
    cut: str | None  # where and how the archive stops early (None: it ends properly)


def _scan_tar(tf: tarfile.TarFile, path: Path) -> _TarScan:
    """Read headers one by one, keeping those before a cut.

    `getmembers()` throws away every header when a member's data is cut ("unexpected end of data"),
    and stops quietly at a short or garbled header; reading header by header keeps what precedes
    the damage, which is what makes a truncated shard's intact samples readable by seeking.
    """
    members: list[tarfile.TarInfo] = []
    error: Exception | None = None
    try:
        while (m := tf.next()) is not None:
            members.append(m)
    except (tarfile.TarError, EOFError, ValueError) as err:  # what a cut or garbled header raises
        error = err
    size, end = path.stat().st_size, tf.offset
    with open(path, "rb") as fh:
        fh.seek(min(end, size))
        block = fh.read(tarfile.BLOCKSIZE)
    last = members[-1] if members else None
    if last is not None and last.offset_data + last.size > size:
        cut = f"cut at byte {size}, inside member {last.name}"
    elif size <= end:
        cut = f"cut at byte {size}, after member {last.name if last else '-'} (no end-of-archive marker)"
    elif len(block) < tarfile.BLOCKSIZE:
        cut = f"cut at byte {size}, inside the header at byte {end}"
    elif error is not None:
        cut = f"unreadable header at byte {end} ({error})"
    elif block.count(0) != len(block):  # tarfile stops without a word at a garbled header
        cut = f"corrupt header at byte {end}"
    else:
        cut = None
    return _TarScan(members, size, cut)


def _open_tar(path: Path) -> tuple[tarfile.TarFile, _TarScan]:
    """Open a tar and scan its headers; ShardError when not even the first header can be read."""
    try:
        tf = tarfile.open(path, "r:")  # noqa: SIM115 -- closed by the caller (the reading generator)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(path, f"unreadable tar: truncated or not a tar ({err})") from None
    try:
        return tf, _scan_tar(tf, path)
    except OSError as err:
        tf.close()
        raise ShardError(path, f"unreadable tar ({err})") from None


def tar_member_names(path: str | Path) -> list[str]:
    """Names of a tar's members, up to a cut if it is truncated (ShardError if it is not a tar)."""
    tf, scan = _open_tar(Path(path))
    with tf:
        return [m.name for m in scan.members]


def _group_runs(members: list[tarfile.TarInfo]) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Runs of adjacent file members sharing a key (WebDataset's grouping), in file order."""
    runs: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    for m in members:
        if not m.isfile():
            continue
        key, ext = split_member_name(m.name)
        if runs and runs[-1][0] == key:
            runs[-1][1].setdefault(ext, m)
        else:
            runs.append((key, {ext: m}))
    return runs


def _split_cut_run(
    runs: list[tuple[str, dict[str, tarfile.TarInfo]]], scan: _TarScan, caption_ext: str
) -> tuple[list[tuple[str, dict[str, tarfile.TarInfo]]], BadSample | None]:
    """The runs to classify, and the item that reports a cut (None when the tar ends properly).

    The cut is reported once: with the key of the sample it went through (a member partly present,
    or the image or caption missing), else with key "" after the last sample, which is whole and kept
    (only an optional member after it, a .json, can have been lost).
    """
    if scan.cut is None:
        return runs, None
    if runs:
        key, parts = runs[-1]
        partial = any(m.offset_data + m.size > scan.size for m in parts.values())
        if partial or caption_ext not in parts or not any(e in parts for e in IMAGE_EXTS):
            return runs[:-1], BadSample(key, TRUNCATED, scan.cut)
    return runs, BadSample("", TRUNCATED, scan.cut)


def _iter_tar(path: Path, image_field: str, caption_ext: str) -> Iterator[RawSample | BadSample]:
    tf, scan = _open_tar(path)
    runs = _group_runs(scan.members)
    seen = Counter(key for key, _ in runs)  # a key with more than one run is "ungrouped"
    runs, cut = _split_cut_run(runs, scan, caption_ext)
    prefer = [image_field] if image_field in IMAGE_EXTS else []
    reported: set[str] = set()

    def read(m: tarfile.TarInfo | None) -> bytes | None:
        if m is None:
            return None
        try:
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ShardError(path, f"cannot read member {m.name} ({err})") from None
        if len(data) != m.size:
            raise ShardError(path, f"truncated member {m.name}")
        return data

    with tf:
        for key, parts in runs:
            if seen[key] > 1:
                if key not in reported:
                    reported.add(key)
                    yield BadSample(key, "ungrouped")
                continue
            image_ext = next((e for e in [*prefer, *IMAGE_EXTS] if e in parts), None)
            yield _make_sample(
                key,
                read(parts.get(image_ext)) if image_ext else None,
                read(parts.get(caption_ext)),
                read(parts.get("json")),
            )
        if cut is not None:
            yield cut


def _pick_column(names: list[str], wanted: str, candidates: tuple[str, ...]) -> str | None:
    if wanted != "auto":
        return wanted if wanted in names else None
    return next((c for c in candidates if c in names), None)


def _iter_parquet(path: Path, image_field: str, caption_field: str) -> Iterator[RawSample | BadSample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        # Schema and row-group offsets live only in the footer, so a file cut short holds nothing
        # that can be located: say so rather than leave the user to decode pyarrow's wording.
        raise ShardError(
            path, f"not a readable parquet file: truncated (no footer) or not parquet at all ({err})"
        ) from None
    names = pf.schema_arrow.names
    image_col = _pick_column(names, image_field, PARQUET_IMAGE_COLUMNS)
    caption_col = _pick_column(names, caption_field, PARQUET_CAPTION_COLUMNS)
    if image_col is None or caption_col is None:
        what = "image" if image_col is None else "caption"
        raise ShardError(
            path,
            f"no {what} column (wanted {image_field if what == 'image' else caption_field!r}; "
            f"columns: {names})",
        )
    cols = [c for c in dict.fromkeys(["key", image_col, caption_col, "json"]) if c in names]
    seen: set[str] = set()
    row = 0
    batches = pf.iter_batches(batch_size=256, columns=cols)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            lists = {c: _as_bytes_list(batch.column(c)) for c in cols if c != "key"}
            keys = batch.column("key").to_pylist() if "key" in cols else [None] * batch.num_rows
        except (pa.ArrowException, OSError) as err:
            raise ShardError(path, f"cannot read rows after {row} ({err})") from None
        for i, key in enumerate(keys):
            key = str(key) if key is not None else f"{path.stem}_{row + i:09d}"
            if key in seen:  # a key split over two rows: the parquet analogue of ungrouped members
                yield BadSample(key, "ungrouped")
                continue
            seen.add(key)
            meta = lists["json"][i] if "json" in lists else None
            yield _make_sample(key, lists[image_col][i], lists[caption_col][i], meta)
        row += batch.num_rows


def _as_bytes_list(column: Any) -> list[bytes | None]:
    """Column values as raw bytes (strings re-encoded; HF-style {bytes, path} structs unwrapped)."""
    import pyarrow as pa

    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        column = column.field("bytes")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.binary())
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise pa.ArrowInvalid(f"column of type {column.type} is not bytes or text")
    return column.to_pylist()
