"""The epoch plan: which rows of which shards each rank reads, in which order, with which random crop.

Pure functions of the config, the manifests and (epoch, rank, world_size) — no Ray, no image decoding —
so the driver (preflight) and the tests use them without starting anything; `scalelab.data.pipeline`
runs the plan through Ray Data.

1. **Subset (the data axis)** — `select_subset(cfg)`: source i contributes
   n_i = round(n_pairs · w_i / Σw) pairs (n_pairs None: n_i = floor(w_i · min_j N_j / w_j)), taken as
   whole shards in a seeded order (cfg.seed, i) plus a prefix of the last one. The subset ignores the
   epoch, so every epoch sees the same rows, and a smaller n_pairs is a subset of a larger one
   (both are prefixes of the same shard order) — the data-axis points are nested. Never shuffle→limit.
2. **Epoch order** — `plan_epoch(...)`, pure numpy on the driver, from (cfg.seed, epoch) only:
   each source's shards are reordered; sources are interleaved by jittered stratified keys
   (row k of source i sorts at (k + u) / n_i, u ~ U[0,1)), so every window of the order holds each
   source's share to within ±2 rows — mixing weights hold inside every global batch; then rows are
   permuted inside blocks of `4 · decode_batch_size` (each source's rows among its own slots, which
   keeps the proportions). Rank r of world_size takes the positions p ≡ r (mod world_size),
   p < world_size · ⌊N / world_size⌋ (≤ world_size-1 rows per epoch are left out so all ranks get
   equally many). The global order does not depend on world_size, so the global batch of a step
   (the union of the ranks' local batches) is the same contiguous window whatever the worker count;
   the jitter keeps a rank's subsequence from aliasing with the interleave pattern (with weights 1:1
   a fixed ABAB pattern would give rank 0 only A). Unlike `streaming_split` this is deterministic:
   the training code builds one dataset per worker (`build_dataset(..., rank, world_size)`), which
   also gives resume: the epoch order is a function of (seed, epoch), so `(epoch, samples_seen)`
   identifies the remaining rows exactly (`iter_train_batches(..., start_sample=samples_seen)`).
   Costs: every rank opens the shards its rows fall in (the tar reader reads all headers, then seeks
   to the wanted members only); resuming decodes, then drops, the rows before `start_sample`.
3. **Per-row augmentation** — `RowAugment`: a training row's random-resized crop and flip draw from a
   stream seeded by (seed, epoch, index), index being the row's epoch-order position, so a resumed
   epoch decodes identical crops. The crop itself is `scalelab.data.transforms.preprocess_train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scalelab.config import ConfigError, DataConfig
from scalelab.data.manifest import Manifest

__all__ = ["EpochPlan", "RowAugment", "ShardSlice", "plan_epoch", "select_subset", "source_counts"]


@dataclass(frozen=True)
class ShardSlice:
    """The first `take` items (in file order) of one shard of source `source`."""

    source: int
    path: str
    fmt: str
    image_field: str
    caption_field: str
    take: int
    samples: int


@dataclass(frozen=True)
class EpochPlan:
    """One rank's rows of one epoch, in order: which shard slice, which item of it, which position."""

    slices: tuple[ShardSlice, ...]
    slice_id: np.ndarray
    ordinal: np.ndarray
    index: np.ndarray
    total: int  # rows of the epoch over all ranks (before the equal-share cut)

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class RowAugment:
    """Training augmentation of one epoch: random-resized crops with area fraction in `crop_scale`,
    flipped with probability 1/2 when `hflip`. Eval rows, and all rows when `data.augment` is off, get
    none (CLIP's eval transform; `hflip` alone then flips nothing)."""

    seed: int
    epoch: int
    crop_scale: tuple[float, float]
    hflip: bool

    def rng(self, index: int) -> np.random.Generator:
        """Row `index`'s random stream: depends on (seed, epoch, index) only, not on which task or
        worker decodes the row, nor on the rows decoded before it."""
        return _rng(self.seed, self.epoch, index, 4)


def _rng(*parts: int) -> np.random.Generator:
    # SeedSequence needs non-negative entries; negative seeds are valid config values.
    return np.random.default_rng([int(p) % (1 << 63) for p in parts])


def source_counts(cfg: DataConfig, available: list[int]) -> list[int]:
    """Pairs each source contributes (see the module docstring); ConfigError when n_pairs cannot be met."""
    weights = [s.weight for s in cfg.sources]
    if cfg.n_pairs is None:
        scale = min(n / w for n, w in zip(available, weights))
        counts = [math.floor(w * scale + 1e-9) for w in weights]
    else:
        counts = [round(cfg.n_pairs * w / sum(weights)) for w in weights]
        short = [
            f"{s.path}: wants {c}, has {n}"
            for s, c, n in zip(cfg.sources, counts, available)
            if c > n
        ]
        if short:
            raise ConfigError(f"data.n_pairs={cfg.n_pairs} exceeds what the sources hold: {'; '.join(short)}")
    if any(c <= 0 for c in counts):
        raise ConfigError(f"data.n_pairs / data.sources weights leave a source with no pairs: {counts}")
    return counts


def select_subset(cfg: DataConfig) -> list[ShardSlice]:
    """The data axis: a fixed, seeded set of shard slices (whole shards + a prefix of the last one)."""
    manifests = [Manifest.load(s.path) for s in cfg.sources]
    counts = source_counts(cfg, [m.num_samples for m in manifests])
    out: list[ShardSlice] = []
    for i, (src, manifest, want) in enumerate(zip(cfg.sources, manifests, counts)):
        paths = manifest.shard_paths(src.path)
        left = want
        for j in _rng(cfg.seed, i).permutation(len(paths)):
            if left == 0:
                break
            take = min(manifest.shards[j].samples, left)
            if take > 0:
                out.append(
                    ShardSlice(i, str(Path(paths[j]).resolve()), manifest.format, manifest.image_field,
                               manifest.caption_field, take, manifest.shards[j].samples)
                )
                left -= take
    return out


def _source_stream(slices: list[tuple[int, ShardSlice]], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """One source's rows for the epoch: its slices in a new file order, each read front to back."""
    order = rng.permutation(len(slices))
    sid = np.concatenate([np.full(slices[k][1].take, slices[k][0], dtype=np.int64) for k in order])
    ordinal = np.concatenate([np.arange(slices[k][1].take, dtype=np.int64) for k in order])
    return sid, ordinal


def plan_epoch(
    cfg: DataConfig,
    epoch: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    slices: list[ShardSlice] | None = None,
) -> EpochPlan:
    """The rows rank `rank` reads in epoch `epoch`, in order (pure function of cfg, epoch, rank, world)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    slices = select_subset(cfg) if slices is None else slices
    sids, ords, keys, srcs = [], [], [], []
    for i in range(len(cfg.sources)):
        mine = [(k, s) for k, s in enumerate(slices) if s.source == i]
        if not mine:
            continue
        sid, ordinal = _source_stream(mine, _rng(cfg.seed, epoch, i, 1))
        n = len(sid)
        # Jittered stratified keys: row k lands in [k/n, (k+1)/n), so any window of the merged order
        # holds n_i/N of it within ±2 rows, and a stride-world_size subsequence does not alias.
        keys.append((np.arange(n) + _rng(cfg.seed, epoch, i, 2).random(n)) / n)
        sids.append(sid)
        ords.append(ordinal)
        srcs.append(np.full(n, i, dtype=np.int64))
    order = np.argsort(np.concatenate(keys), kind="stable")
    sid, ordinal, src = np.concatenate(sids)[order], np.concatenate(ords)[order], np.concatenate(srcs)[order]
    _permute_within_blocks(sid, ordinal, src, 4 * cfg.decode_batch_size, _rng(cfg.seed, epoch, 3))
    total = len(sid)
    positions = np.arange(rank, world_size * (total // world_size), world_size, dtype=np.int64)
    return EpochPlan(tuple(slices), sid[positions], ordinal[positions], positions, total)


def _permute_within_blocks(
    sid: np.ndarray, ordinal: np.ndarray, src: np.ndarray, block: int, rng: np.random.Generator
) -> None:
    """In place: inside each block, shuffle each source's rows among that source's slots."""
    for start in range(0, len(sid), block):
        stop = min(start + block, len(sid))
        for s in np.unique(src[start:stop]):
            slots = start + np.flatnonzero(src[start:stop] == s)
            perm = slots[rng.permutation(len(slots))]
            sid[slots], ordinal[slots] = sid[perm], ordinal[perm]
