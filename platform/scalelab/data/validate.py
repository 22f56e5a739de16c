"""Check a dataset directory sample by sample, and index foreign shards into a manifest.

`validate_dataset` reads every shard (listed by manifest.json, or found by globbing when there is
none), decodes every image with Pillow, and counts good samples and each kind of problem, per shard
and in total. A truncated tar counts its intact samples as good (the pipeline trains on them) and is
marked truncated; like an unreadable shard it makes the report not ok, since the file is damaged.
`index_dataset` does the same scan over shards written elsewhere (img2dataset output, say) and writes
the manifest that the pipeline needs, with the good-sample counts and hashes.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from scalelab.data.manifest import MANIFEST_NAME, Format, Manifest, ShardInfo, sha256_file
from scalelab.data.shards import (
    IMAGE_EXTS,
    PARQUET_CAPTION_COLUMNS,
    PARQUET_IMAGE_COLUMNS,
    TRUNCATED,
    BadSample,
    ShardError,
    finish_dataset,
    iter_shard,
    split_member_name,
    tar_member_names,
)

__all__ = ["ShardReport", "ValidationReport", "find_shards", "index_dataset", "validate_dataset"]

UNREADABLE = "unreadable_shard"
_EXAMPLES = 5  # bad keys kept per reason and shard, to point at without flooding the report


@dataclass
class ShardReport:
    """What one shard holds: good samples, problem counts (with a few example keys), its error when
    unreadable, or where it stops when truncated (its good samples are those before the cut)."""

    path: str
    good: int = 0
    problems: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    truncated: str | None = None
    image_exts: set[str] = field(default_factory=set)

    @property
    def status(self) -> str:
        if self.error is not None:
            return f"unreadable: {self.error}"
        return f"truncated: {self.truncated}" if self.truncated is not None else ""

    def add_bad(self, key: str, reason: str) -> None:
        self.problems[reason] = self.problems.get(reason, 0) + 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < _EXAMPLES:
            keys.append(key)


@dataclass
class ValidationReport:
    """Totals over a dataset directory plus the per-shard breakdown. `ok` is False when a shard (or
    the manifest) could not be read or a shard is truncated; bad samples alone are counted, not fatal."""

    directory: str
    format: str
    shards: list[ShardReport]
    manifest_error: str | None = None
    mismatches: list[str] = field(default_factory=list)

    @property
    def good(self) -> int:
        return sum(s.good for s in self.shards)

    @property
    def problems(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.shards:
            total.update(s.problems)
        unreadable = sum(s.error is not None for s in self.shards)
        if unreadable:
            total[UNREADABLE] = unreadable
        return dict(sorted(total.items()))

    @property
    def bad(self) -> int:
        return sum(n for reason, n in self.problems.items() if reason != UNREADABLE)

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        return [(s.path, s.error) for s in self.shards if s.error is not None]

    @property
    def truncated(self) -> list[tuple[str, str]]:
        return [(s.path, s.truncated) for s in self.shards if s.truncated is not None]

    @property
    def ok(self) -> bool:
        return self.manifest_error is None and not self.unreadable and not self.truncated

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "format": self.format,
            "ok": self.ok,
            "good": self.good,
            "bad": self.bad,
            "problems": self.problems,
            "unreadable": [{"path": p, "error": e} for p, e in self.unreadable],
            "truncated": [{"path": p, "detail": d} for p, d in self.truncated],
            "manifest_error": self.manifest_error,
            "mismatches": self.mismatches,
            "shards": [
                {
                    "path": s.path,
                    "good": s.good,
                    "problems": s.problems,
                    "examples": s.examples,
                    "error": s.error,
                    "truncated": s.truncated,
                }
                for s in self.shards
            ],
        }

    def table(self) -> str:
        """Human-readable summary: one row per shard, then totals, unreadable shards, mismatches."""
        reasons = sorted({r for s in self.shards for r in s.problems})
        head = ["shard", "good", *reasons, "status"]
        rows = [
            [s.path, str(s.good), *(str(s.problems.get(r, 0)) for r in reasons), s.status]
            for s in self.shards
        ]
        damaged = {"truncated": len(self.truncated), "unreadable": len(self.unreadable)}
        rows.append(
            [
                "TOTAL",
                str(self.good),
                *(str(self.problems.get(r, 0)) for r in reasons),
                ", ".join(f"{n} {what}" for what, n in damaged.items() if n),
            ]
        )
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [f"{self.directory} ({self.format}, {len(self.shards)} shards)"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        if self.manifest_error:
            lines.append(f"manifest: {self.manifest_error}")
        lines += [f"mismatch: {m}" for m in self.mismatches]
        lines.append(self._verdict())
        return "\n".join(lines)

    def _verdict(self) -> str:
        if self.ok:
            return "OK"
        why = [f"{len(self.unreadable)} unreadable shard(s)"] if self.unreadable else []
        if self.truncated:
            # Say what training does with it: NOT OK here must not read as "the run cannot use this".
            why.append(f"{len(self.truncated)} truncated shard(s) (the samples before each cut are "
                       "counted as good and used in training; re-fetch the shard to get the rest)")
        if self.manifest_error:
            why.append("invalid manifest")
        return "NOT OK: " + "; ".join(why)


def find_shards(directory: str | Path) -> tuple[Format, list[Path]]:
    """Shards of a directory without a manifest: `*.tar`, else `*.parquet`, sorted by name.

    Tars win: img2dataset writes a metadata-only `.parquet` next to each `.tar`.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist")
    tars = sorted(root.glob("*.tar"))
    if tars:
        return "webdataset", tars
    parquets = sorted(root.glob("*.parquet"))
    if parquets:
        return "parquet", parquets
    raise FileNotFoundError(f"no shards (*.tar or *.parquet) in {root}")


def _decodes(image: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(image)) as img:
            img.load()
        return True
    except Exception:  # Pillow raises many types (OSError, SyntaxError, ValueError, …) for bad bytes
        return False


def _tar_image_exts(path: Path) -> set[str]:
    """Image extensions used by a tar's members (headers only, up to a cut; the shard was already read)."""
    return {e for e in (split_member_name(n)[1] for n in tar_member_names(path)) if e in IMAGE_EXTS}


def scan_shard(
    path: Path,
    *,
    fmt: Format,
    image_field: str = "auto",
    caption_field: str | None = None,
    decode: bool = True,
) -> ShardReport:
    """Read one shard fully: good samples (image decodes when `decode`), problems, or the error."""
    report = ShardReport(path=path.name)
    if not path.is_file():
        report.error = "missing"
        return report
    try:
        for sample in iter_shard(path, fmt=fmt, image_field=image_field, caption_field=caption_field):
            if isinstance(sample, BadSample):
                report.add_bad(sample.key, sample.reason)
                if sample.reason == TRUNCATED:
                    report.truncated = sample.detail or "truncated"
            elif decode and not _decodes(sample.image):
                report.add_bad(sample.key, "undecodable_image")
            else:
                report.good += 1
        if fmt == "webdataset":
            report.image_exts = _tar_image_exts(path)
    except ShardError as err:
        report.error = err.reason
    return report


def validate_dataset(directory: str | Path, *, decode: bool = True) -> ValidationReport:
    """Read every shard of a dataset directory and count good samples and problems (see module doc)."""
    root = Path(directory)
    manifest_error, mismatches = None, []
    manifest = None
    if (root / MANIFEST_NAME).exists():
        try:
            manifest = Manifest.load(root)
        except ValueError as err:
            manifest_error = str(err).splitlines()[0]
    if manifest is not None:
        fmt, paths = manifest.format, manifest.shard_paths(root)
        fields = {"image_field": manifest.image_field, "caption_field": manifest.caption_field}
    else:
        fmt, paths = find_shards(root)
        fields = {}
    reports = [scan_shard(p, fmt=fmt, decode=decode, **fields) for p in paths]
    if manifest is not None:
        mismatches = _compare(manifest, root, reports)
    return ValidationReport(str(root), fmt, reports, manifest_error, mismatches)


def _compare(manifest: Manifest, root: Path, reports: list[ShardReport]) -> list[str]:
    """Where the shards on disk disagree with what the manifest says about them."""
    out = []
    for info, rep in zip(manifest.shards, reports):
        if rep.error is not None:
            continue
        if rep.truncated is not None:  # the hash differs, of course; the count says what the cut lost
            out.append(f"{info.path}: manifest says {info.samples} samples, {rep.good} intact before the cut")
            continue
        if rep.good != info.samples:
            out.append(f"{info.path}: manifest says {info.samples} samples, {rep.good} are good")
        if sha256_file(root / info.path) != info.sha256:
            out.append(f"{info.path}: sha256 differs from the manifest")
    return out


def index_dataset(
    directory: str | Path, *, source: str = "index", skip_unreadable: bool = False, decode: bool = True
) -> Manifest:
    """Write manifest.json for shards written elsewhere: good samples per shard, hashes, format, fields.

    An unreadable or truncated shard raises ShardError unless `skip_unreadable` (then it is left out
    and named in `extra["index"]["skipped"]`). A truncated one is refused too although the pipeline
    could read its intact part: a manifest records a shard as complete, and a damaged download is
    better fetched again than frozen into one. The `extra` of an existing valid manifest is kept.
    """
    root = Path(directory)
    fmt, paths = find_shards(root)
    reports = [scan_shard(p, fmt=fmt, decode=decode) for p in paths]
    skipped = [r for r in reports if r.status]
    if skipped and not skip_unreadable:
        first = skipped[0]
        if first.error is not None:
            raise ShardError(root / first.path, first.error)
        raise ShardError(root / first.path, f"truncated ({first.truncated}; {first.good} intact samples "
                         "before the cut): fetch it again, or leave it out with --skip-unreadable")
    kept = [(p, r) for p, r in zip(paths, reports) if not r.status]
    if not kept:
        raise ShardError(root, "no readable shard to index")
    shards = [
        ShardInfo(path=p.name, samples=r.good, bytes=p.stat().st_size, sha256=sha256_file(p)) for p, r in kept
    ]
    image_field, caption_field = _detect_fields(fmt, [p for p, _ in kept], [r for _, r in kept])
    extra = _previous_extra(root)
    problems: Counter[str] = Counter()
    for _, r in kept:  # a shard left out is named in "skipped"; its samples are not in the dataset at all
        problems.update(r.problems)
    extra["index"] = {"problems": dict(sorted(problems.items())), "skipped": [r.path for r in skipped]}
    return finish_dataset(root, shards, fmt=fmt, source=source, image_field=image_field,
                          caption_field=caption_field, extra=extra)


def _detect_fields(fmt: Format, paths: list[Path], reports: list[ShardReport]) -> tuple[str, str]:
    if fmt == "webdataset":
        exts = set().union(*(r.image_exts for r in reports))
        return (exts.pop() if len(exts) == 1 else "auto"), "txt"
    import pyarrow.parquet as pq

    names = pq.ParquetFile(paths[0]).schema_arrow.names
    image = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), "auto")
    caption = next((c for c in PARQUET_CAPTION_COLUMNS if c in names), "caption")
    return image, caption


def _previous_extra(root: Path) -> dict[str, Any]:
    try:
        return dict(Manifest.load(root).extra)
    except (FileNotFoundError, ValueError):
        return {}
