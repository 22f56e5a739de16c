"""The dataset manifest: `manifest.json` next to the shards, saying what they hold and their hashes.

A dataset directory holds shards (`00000.tar`, … or `00000.parquet`, …) and one manifest. Readers
trust the manifest for the format, the field names, the sample counts (the data axis picks a seeded
subset of shards by them) and the content hash (two datasets with the same hash hold the same bytes).
The creation time is deliberately outside the content hash, so rewriting the same data gives the same
hash.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "content_hash",
    "sha256_file",
]

MANIFEST_NAME = "manifest.json"
Format = Literal["webdataset", "parquet"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShardInfo(_Record):
    """One shard file, its path relative to the dataset directory."""

    path: str = Field(description="Shard file name relative to the dataset directory, e.g. '00000.tar'.")
    samples: int = Field(ge=0, description="Good samples in the shard.")
    bytes: int = Field(ge=0, description="File size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file (hex).")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (shards can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hash(shards: list[ShardInfo]) -> str:
    """sha256 over the shard hashes in order (one per line): the identity of the dataset's bytes."""
    return hashlib.sha256("\n".join(s.sha256 for s in shards).encode()).hexdigest()


def _package_version() -> str:
    from scalelab import __version__

    return __version__


class Manifest(_Record):
    """What a dataset directory holds. `Manifest.build` fills the derived fields."""

    format: Format
    source: str = Field(description="Where the data came from: 'synth', 'labels:digits', 'index', …")
    image_field: str = Field(
        description="Tar: image extension of the members ('png', 'jpg', or 'auto' when mixed). "
        "Parquet: the image bytes column."
    )
    caption_field: str = Field(description="Tar: 'txt'. Parquet: the caption column.")
    num_samples: int = Field(ge=0)
    shards: list[ShardInfo]
    content_hash: str
    created: str = Field(description="ISO 8601 creation time (UTC); not part of the content hash.")
    scalelab_version: str
    extra: dict[str, Any] = Field(default_factory=dict, description="Free-form: world config, class names…")

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        # A hand-edited or half-written manifest must not silently mislead the data axis.
        paths = [s.path for s in self.shards]
        if len(set(paths)) != len(paths):
            raise ValueError("shard paths repeat")
        for p in paths:
            if Path(p).is_absolute() or ".." in Path(p).parts:
                raise ValueError(f"shard path {p!r} must be relative to the dataset directory")
        total = sum(s.samples for s in self.shards)
        if self.num_samples != total:
            raise ValueError(f"num_samples={self.num_samples} but the shards hold {total}")
        if self.content_hash != content_hash(self.shards):
            raise ValueError("content_hash does not match the shard hashes")
        return self

    @classmethod
    def build(
        cls,
        *,
        fmt: Format,
        source: str,
        image_field: str,
        caption_field: str,
        shards: list[ShardInfo],
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """A manifest over `shards` (sorted by path) with counts, hash, time and version filled in."""
        ordered = sorted(shards, key=lambda s: s.path)
        return cls(
            format=fmt,
            source=source,
            image_field=image_field,
            caption_field=caption_field,
            num_samples=sum(s.samples for s in ordered),
            shards=ordered,
            content_hash=content_hash(ordered),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            scalelab_version=_package_version(),
            extra=dict(extra or {}),
        )

    @classmethod
    def load(cls, dir_or_file: str | Path) -> Manifest:
        """Read `DIR/manifest.json` (or the given file). Errors name the path and what to do."""
        path = Path(dir_or_file)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no dataset manifest at {path}; write the dataset with scalelab, "
                f"or index foreign shards with `scalelab data index {path.parent}`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"{path}: invalid manifest:\n{err}") from None

    def save(self, directory: str | Path) -> Path:
        """Write `DIR/manifest.json` atomically (temp file + rename); returns its path."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_name(MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    def shard_paths(self, directory: str | Path) -> list[Path]:
        """Absolute-or-as-given paths of the shards, in manifest order."""
        root = Path(directory)
        if root.name == MANIFEST_NAME and root.is_file():
            root = root.parent
        return [root / s.path for s in self.shards]
