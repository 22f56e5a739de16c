"""The decoded training subset (`data.cache`) kept on disk, so the next run on the same data skips decoding.

A sweep trains many trials on a few data sizes: without this every trial's worker decodes its subset
through Ray Data again (seconds per trial: the decode tasks start, read the shards, decode and tokenize).
With it the first run of a subset writes `<dir>/<key>.pkl` and later runs — other trials, a resumed
run, the same command again — load it in a fraction of a second.

The key is a hash of everything a decoded row depends on: the data config (sources, subset size and
seed, image size, context length, ...; not the decode parallelism, which changes speed, not rows), the
bytes of every source's manifest and of the tokenizer, each shard file's size and modification time
(a shard rewritten in place gets a new key; labelled data, `data.labels`, has no tokenizer), and
`FORMAT` (bumped when decoding changes). A file that
cannot be read is decoded again and rewritten; writes are atomic (temp file + rename), so trials
decoding the same subset at once both succeed and leave one whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

from scalelab.config import DataConfig
from scalelab.data.pipeline import DecodedSubset, decode_subset
from scalelab.data.tokenizer import tokenizer_path

__all__ = ["FORMAT", "cached_decode", "subset_key"]

FORMAT = 1
# Fields that change how fast rows are decoded, never what they hold.
_SPEED_ONLY = ("decode_tasks", "decode_batch_size", "decode_cpus")


def subset_key(cfg: DataConfig) -> str:
    """The hex digest naming `cfg`'s decoded subset (module docstring)."""
    h = hashlib.sha256()
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _SPEED_ONLY}
    h.update(json.dumps({"format": FORMAT, "data": settings}, sort_keys=True).encode())
    for source in cfg.sources:
        manifest = Path(source.path) / "manifest.json"
        h.update(manifest.read_bytes())
        for shard in json.loads(manifest.read_text()).get("shards", []):
            stat = (Path(source.path) / shard["path"]).stat()
            h.update(f"{shard['path']}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    if cfg.labels is None:  # labelled rows hold no tokens: no tokenizer is read
        h.update(tokenizer_path(cfg).read_bytes())
    return h.hexdigest()[:32]


def cached_decode(cfg: DataConfig, directory: str | Path | None) -> DecodedSubset:
    """`decode_subset(cfg)`, read from `directory` when an earlier run left it there (written otherwise).
    `directory` None: decode without the disk cache."""
    if directory is None:
        return decode_subset(cfg)
    path = Path(directory) / f"{subset_key(cfg)}.pkl"
    try:
        with path.open("rb") as f:
            found = pickle.load(f)
        if isinstance(found, DecodedSubset):
            return found
    except FileNotFoundError:
        pass
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError):
        pass  # truncated or from another version: decode again and replace it
    subset = decode_subset(cfg)
    _write_atomic(path, subset)
    return subset


def _write_atomic(path: Path, subset: DecodedSubset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(subset, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
