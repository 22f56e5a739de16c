"""Ray Data input pipeline: a deterministic, resumable, mixed stream of decoded (image, tokens) pairs.

The only module of `scalelab.data` that imports Ray. Three steps:

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
3. **Ray Data** — `from_items(block specs) → map_batches(_read_decode)` as tasks (`decode_tasks` at
   once, `decode_cpus` each): each task reads one block's rows (`decode_batch_size` of them) from
   their shards and decodes them.
   Shards are read by our own map function through `scalelab.data.shards.iter_shard` rather than
   `read_webdataset` because the requirements are row-exact: a prefix of the last shard, a fixed
   per-epoch row order, a truncated / unreadable shard logged with its path and turned into invalid
   rows instead of failing the job, and the same code for tars and parquet. `preserve_order` is
   set on the dataset's context so the order survives parallel execution.

Rows: `image` float32 [3, S, S] (RGB normalised with CLIP's mean/std), `tokens` int64 [L] (padding 0),
`valid` bool, `reason` str ("" when valid), `key` str, `source` int64, `index` int64 (epoch-order
position). Bad rows keep zero image/tokens and are dropped and counted by `iter_train_batches`.
Augmentation randomness is seeded by (seed, epoch, index), so a resumed epoch decodes identical crops.
A row is thus a function of (cfg, epoch, index) and the files, the tokenizer included: a Unigram
tokenizer trained again on the same captions is another file (other ids), hence another run.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.data
from PIL import Image

from scalelab.config import ConfigError, DataConfig
from scalelab.data.batches import Batch, TrainBatchIterator, iter_train_batches
from scalelab.data.transforms import CLIP_MEAN, CLIP_STD

if TYPE_CHECKING:  # torch is imported where batches are made: decode tasks start faster without it
    pass

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Batch",
    "DecodedSubset",
    "EpochPlan",
    "ShardSlice",
    "TrainBatchIterator",
    "build_dataset",
    "decode_subset",
    "iter_cached_epoch",
    "iter_train_batches",
    "plan_epoch",
    "select_subset",
    "source_counts",
    "tokenizer_path",
]

log = logging.getLogger(__name__)

UNREADABLE = "unreadable_shard"  # reason for rows of a shard that could not be read (or ended early)


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
    from scalelab.data.manifest import Manifest

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


# --------------------------------------------------------------------------- Ray Data stages
def _read_block(spec: dict[str, Any], *, slices: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """Read the rows of one block from their shards; bad samples and unreadable shards become invalid rows."""
    from scalelab.data.shards import TRUNCATED, BadSample, iter_shard

    sid = np.asarray(spec["slice_id"], dtype=np.int64)
    ordinal = np.asarray(spec["ordinal"], dtype=np.int64)
    found: dict[tuple[int, int], dict[str, Any]] = {}
    cut: set[int] = set()  # truncated shards: their rows past the cut are TRUNCATED, not unreadable
    for s in np.unique(sid):
        sl = slices[s]
        wanted = set(ordinal[sid == s].tolist())
        last = max(wanted)
        try:
            for k, sample in enumerate(iter_shard(sl["path"], fmt=sl["fmt"], image_field=sl["image_field"],
                                                  caption_field=sl["caption_field"])):
                if isinstance(sample, BadSample) and sample.reason == TRUNCATED:  # the shard's last item
                    cut.add(int(s))
                    log.warning("truncated shard %s (%s): its items from %d on are skipped", sl["path"],
                                sample.detail, k)
                if k in wanted:
                    bad = isinstance(sample, BadSample)
                    found[(int(s), k)] = {
                        "key": sample.key,
                        "image_bytes": b"" if bad else sample.image,
                        "caption": "" if bad else sample.caption,
                        "valid": not bad,
                        "reason": sample.reason if bad else "",
                    }
                if k >= last:
                    break
        except Exception as err:  # a broken shard must not stop the epoch: log it, count its rows
            log.warning("skipping unreadable shard %s: %s", sl["path"], err)
    missing = {"key": "", "image_bytes": b"", "caption": "", "valid": False, "reason": UNREADABLE}
    rows = []
    for s, k, p in zip(sid.tolist(), ordinal.tolist(), spec["index"]):
        row = dict(found.get((s, k)) or {**missing, "reason": TRUNCATED if s in cut else UNREADABLE})
        row.update(source=slices[s]["source"], index=int(p))
        rows.append(row)
    return rows


class _Decode:
    """Actor: decode + crop/resize + normalise images, tokenize captions (the tokenizer loads once)."""

    def __init__(self, tokenizer: str, image_size: int, context_length: int, train: bool, augment: bool,
                 crop_scale: tuple[float, float], hflip: bool, seed: int, epoch: int) -> None:
        from scalelab.data.tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer)
        self.size, self.ctx = image_size, context_length
        self.random_crop = train and augment
        self.flip = train and hflip
        self.crop_scale, self.seed, self.epoch = crop_scale, seed, epoch
        self.mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
        self.std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["valid"])
        images = np.zeros((n, 3, self.size, self.size), dtype=np.float32)
        valid = np.asarray(batch["valid"], dtype=bool).copy()
        reason = np.asarray(batch["reason"], dtype=object).copy()
        for r in np.flatnonzero(valid):
            try:
                images[r] = self._image(batch["image_bytes"][r], int(batch["index"][r]))
            except Exception:  # any decoder failure is a bad sample, not a crashed epoch
                valid[r], reason[r] = False, "undecodable_image"
        tokens = np.zeros((n, self.ctx), dtype=np.int64)
        ok = np.flatnonzero(valid)
        if len(ok):
            tokens[ok] = self.tok.encode_batch([str(batch["caption"][r]) for r in ok], self.ctx)
        return {"image": images, "tokens": tokens, "valid": valid, "reason": reason.astype(str),
                "key": np.asarray(batch["key"]).astype(str), "source": np.asarray(batch["source"], np.int64),
                "index": np.asarray(batch["index"], np.int64)}

    def _image(self, data: bytes, index: int) -> np.ndarray:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB")
        if self.random_crop:
            rng = _rng(self.seed, self.epoch, index, 4)
            box = _random_resized_box(img.width, img.height, self.crop_scale, rng)
            if self.flip and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                box = (img.width - box[2], box[1], img.width - box[0], box[3])
        else:  # eval: shorter side to S, centre crop (CLIP's eval transform)
            side = min(img.width, img.height)
            x0, y0 = (img.width - side) // 2, (img.height - side) // 2
            box = (x0, y0, x0 + side, y0 + side)
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (arr - self.mean) / self.std


@functools.lru_cache(maxsize=8)
def _decoder(**decode: Any) -> _Decode:
    """One `_Decode` per (settings, epoch) per process: Ray reuses its worker processes across tasks,
    so the tokenizer loads once per process instead of once per block."""
    return _Decode(**decode)


def _read_decode(specs: dict[str, np.ndarray], *, plan: Any, slices: tuple[dict[str, Any], ...],
                 **decode: Any) -> dict[str, np.ndarray]:
    """Task: read the rows of its blocks from the shards, then decode them.

    One stage rather than read tasks + decode tasks: raw bytes skip the object store. Tasks rather
    than an actor pool: an actor pool is started (processes, imports, tokenizer) for every epoch's
    dataset, which cost seconds per epoch per worker; tasks run in Ray's pooled, already-warm worker
    processes.
    """
    table = ray.get(plan) if isinstance(plan, ray.ObjectRef) else np.asarray(plan)
    decoder = _decoder(**decode)
    out = []
    for a, b in zip(specs["start"].tolist(), specs["stop"].tolist()):
        sid, ordinal, index = table[:, a:b]
        rows = _read_block({"slice_id": sid, "ordinal": ordinal, "index": index}, slices=slices)
        out.append(decoder(_columns(rows)))
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    for k in ("image_bytes", "caption", "reason", "key"):
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]  # element-wise: keeps bytes objects intact
        cols[k] = col
    cols["valid"] = np.array([r["valid"] for r in rows], dtype=bool)
    cols["source"] = np.array([r["source"] for r in rows], dtype=np.int64)
    cols["index"] = np.array([r["index"] for r in rows], dtype=np.int64)
    return cols


def _random_resized_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (area fraction in `scale`, aspect in [3/4, 4/3])."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    side = min(width, height)  # fallback: centre square
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def tokenizer_path(cfg: DataConfig) -> Path:
    """cfg.tokenizer, or tokenizer.json next to the first source's manifest."""
    from scalelab.data.tokenizer import TOKENIZER_NAME

    path = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.sources[0].path) / TOKENIZER_NAME
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} — train one with `scalelab data tokenizer "
            f"{cfg.sources[0].path}` or set data.tokenizer"
        )
    return path


def build_dataset(
    cfg: DataConfig, *, epoch: int = 0, train: bool = True, rank: int = 0, world_size: int = 1
) -> ray.data.Dataset:
    """This rank's rows of one epoch as a lazy Ray Dataset (see the module docstring for the order).

    `train=False` switches to the eval transform (resize + centre crop); the order still follows
    `epoch`. Build one dataset per epoch and per worker; its decode tasks run in Ray's pooled
    worker processes, so a new epoch starts in well under a second once they are warm.
    """
    tok = tokenizer_path(cfg)
    plan = plan_epoch(cfg, epoch, rank=rank, world_size=world_size)
    if len(plan) == 0:
        raise RuntimeError(f"epoch {epoch}, rank {rank}/{world_size}: no rows selected from {cfg.sources}")
    step = cfg.decode_batch_size
    specs = [{"start": a, "stop": min(a + step, len(plan))} for a in range(0, len(plan), step)]
    # The plan goes through the object store once (zero-copy for tasks on the node), not per task.
    plan_ref = ray.put(np.stack([plan.slice_id, plan.ordinal, plan.index]))
    ds = ray.data.from_items(specs, override_num_blocks=len(specs)).map_batches(
        _read_decode,
        compute=ray.data.TaskPoolStrategy(size=cfg.decode_tasks),
        num_cpus=cfg.decode_cpus,
        batch_size=1,  # one block spec = decode_batch_size rows per call
        batch_format="numpy",
        fn_kwargs={
            "plan": plan_ref, "slices": tuple(asdict(s) for s in plan.slices),
            "tokenizer": str(tok), "image_size": cfg.image_size, "context_length": cfg.context_length,
            "train": train, "augment": cfg.augment, "crop_scale": tuple(cfg.crop_scale), "hflip": cfg.hflip,
            "seed": cfg.seed, "epoch": epoch,
        },
    )
    ds.context.execution_options.preserve_order = True  # this dataset's own context copy
    return ds


# --------------------------------------------------------------------------- in-memory cache
@dataclass(frozen=True)
class DecodedSubset:
    """Every row of the training subset, decoded once (`data.cache`), addressed by shard slice + item."""

    slices: tuple[ShardSlice, ...]
    offsets: np.ndarray  # row of item 0 of slice s = offsets[s]
    columns: dict[str, np.ndarray]  # image, tokens, valid, reason, key, source; one row per subset item

    def rows(self, slice_id: np.ndarray, ordinal: np.ndarray) -> np.ndarray:
        return self.offsets[slice_id] + ordinal


def decode_subset(cfg: DataConfig) -> DecodedSubset:
    """Decode the whole subset once through Ray Data (epoch 0's order, one rank): with augment off a
    row's decoded content depends on the sample only, so every later epoch can reuse it."""
    if cfg.augment:
        raise ValueError("decode_subset needs data.augment: false")
    plan = plan_epoch(cfg, 0)
    sizes = np.array([s.take for s in plan.slices], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rows = offsets[plan.slice_id] + plan.ordinal  # subset row of each epoch-0 position
    columns: dict[str, np.ndarray] = {}
    for batch in build_dataset(cfg, epoch=0).iter_batches(batch_size=cfg.decode_batch_size,
                                                          batch_format="numpy"):
        where = rows[np.asarray(batch["index"], dtype=np.int64)]
        for k in ("image", "tokens", "valid", "reason", "key", "source"):
            col = np.asarray(batch[k])
            if k not in columns:
                columns[k] = np.empty((int(sizes.sum()), *col.shape[1:]), dtype=col.dtype
                                      if k not in ("reason", "key") else object)
            columns[k][where] = col
    return DecodedSubset(plan.slices, offsets, columns)


def iter_cached_epoch(cached: DecodedSubset, cfg: DataConfig, epoch: int, *, rank: int = 0,
                      world_size: int = 1) -> Any:
    """This rank's rows of `epoch` from the cache, in `build_dataset`'s order, as column batches of
    `decode_batch_size` rows (what `iter_train_batches` consumes)."""
    plan = plan_epoch(cfg, epoch, rank=rank, world_size=world_size, slices=list(cached.slices))
    rows = cached.rows(plan.slice_id, plan.ordinal)
    step = cfg.decode_batch_size
    for a in range(0, len(rows), step):
        pick = rows[a:a + step]
        batch = {k: v[pick] for k, v in cached.columns.items()}
        batch["index"] = plan.index[a:a + step]
        yield batch
