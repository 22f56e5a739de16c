"""Ray Data input pipeline: a deterministic, resumable, mixed stream of decoded (image, tokens) pairs.

The only module of `scalelab.data` that imports Ray. It runs the epoch plan of `scalelab.data.plan`
(the data-axis subset, the per-epoch order, the rank split, the per-row crop seeds — pure functions,
re-exported here with `tokenizer_path` and the batching of `scalelab.data.batches`):

**Ray Data** — `from_items(block specs) → map_batches(_read_decode)` as tasks (`decode_tasks` at
once, `decode_cpus` each): each task reads one block's rows (`decode_batch_size` of them) from
their shards and decodes them with the transforms of `scalelab.data.transforms` (the ones evaluation
uses). Shards are read by our own map function through `scalelab.data.shards.iter_shard` rather than
`read_webdataset` because the requirements are row-exact: a prefix of the last shard, a fixed
per-epoch row order, a truncated / unreadable shard logged with its path and turned into invalid
rows instead of failing the job, and the same code for tars and parquet. `preserve_order` is
set on the dataset's context so the order survives parallel execution.

Rows: `image` float32 [3, S, S] (RGB normalised with CLIP's mean/std), `tokens` int64 [L] (padding 0),
`valid` bool, `reason` str ("" when valid), `key` str, `source` int64, `index` int64 (epoch-order
position). With `data.labels` (task classify) rows carry `labels` int64 [max_labels] (class indices,
-1 padding: `scalelab.data.labelled`) and `tokens` is empty ([0]: no tokenizer is needed or loaded).
Bad rows (labels that cannot be used among them) keep zero image/tokens and are dropped and counted by
`iter_train_batches`.
Augmentation randomness is seeded by (seed, epoch, index), so a resumed epoch decodes identical crops.
A row is thus a function of (cfg, epoch, index) and the files, the tokenizer included: a Unigram
tokenizer trained again on the same captions is another file (other ids), hence another run.

**Cache** (`data.cache`) — `decode_subset` decodes the subset once; `iter_cached_epoch` replays any
epoch's plan from memory in the same order.
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import ray.data
from PIL import Image

from scalelab.config import DataConfig
from scalelab.data.batches import Batch, TrainBatchIterator, iter_train_batches
from scalelab.data.labelled import parse_labels
from scalelab.data.plan import EpochPlan, RowAugment, ShardSlice, plan_epoch, select_subset, source_counts
from scalelab.data.tokenizer import load_tokenizer, tokenizer_path
from scalelab.data.transforms import CLIP_MEAN, CLIP_STD, preprocess_eval, preprocess_train

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Batch",
    "DecodedSubset",
    "EpochPlan",
    "RowAugment",
    "ShardSlice",
    "TrainBatchIterator",
    "build_dataset",
    "decode_subset",
    "iter_cached_epoch",
    "iter_train_batches",
    "label_settings",
    "plan_epoch",
    "select_subset",
    "source_counts",
    "tokenizer_path",
]

log = logging.getLogger(__name__)

UNREADABLE = "unreadable_shard"  # reason for rows of a shard that could not be read (or ended early)


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
                        "meta": None if bad else sample.meta,
                        "valid": not bad,
                        "reason": sample.reason if bad else "",
                    }
                if k >= last:
                    break
        except Exception as err:  # a broken shard must not stop the epoch: log it, count its rows
            log.warning("skipping unreadable shard %s: %s", sl["path"], err)
    missing = {"key": "", "image_bytes": b"", "caption": "", "meta": None, "valid": False,
               "reason": UNREADABLE}
    rows = []
    for s, k, p in zip(sid.tolist(), ordinal.tolist(), spec["index"]):
        row = dict(found.get((s, k)) or {**missing, "reason": TRUNCATED if s in cut else UNREADABLE})
        row.update(source=slices[s]["source"], index=int(p))
        rows.append(row)
    return rows


class _Decode:
    """Decode + crop/resize + normalise images, tokenize captions. Runs inside the Ray decode tasks;
    `_decoder` keeps one per process, so the tokenizer loads once per process, not once per block."""

    def __init__(self, tokenizer: str | None, image_size: int, context_length: int, train: bool,
                 augment: bool, crop_scale: tuple[float, float], hflip: bool, seed: int, epoch: int,
                 labels: tuple[str, int, int] | None = None) -> None:
        self.tok = load_tokenizer(tokenizer) if labels is None else None  # classify reads no caption
        self.size, self.ctx = image_size, context_length if labels is None else 0
        self.labels = labels  # (json field, num_classes, max_labels)
        # Random crops only for training rows with data.augment on; hflip never applies without them.
        self.augment = RowAugment(seed, epoch, tuple(crop_scale), hflip) if train and augment else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["valid"])
        images = np.zeros((n, 3, self.size, self.size), dtype=np.float32)
        valid = np.asarray(batch["valid"], dtype=bool).copy()
        reason = np.asarray(batch["reason"], dtype=object).copy()
        out: dict[str, np.ndarray] = {}
        if self.labels is not None:  # before decoding: a row without usable labels is not worth its pixels
            out["labels"] = np.full((n, self.labels[2]), -1, dtype=np.int64)
            for r in np.flatnonzero(valid):
                out["labels"][r], why = parse_labels(batch["meta"][r], *self.labels)
                if why:
                    valid[r], reason[r] = False, why
        for r in np.flatnonzero(valid):
            try:
                images[r] = self._image(batch["image_bytes"][r], int(batch["index"][r]))
            except Exception:  # any decoder failure is a bad sample, not a crashed epoch
                valid[r], reason[r] = False, "undecodable_image"
        tokens = np.zeros((n, self.ctx), dtype=np.int64)
        ok = np.flatnonzero(valid)
        if len(ok) and self.tok is not None:
            tokens[ok] = self.tok.encode_batch([str(batch["caption"][r]) for r in ok], self.ctx)
        return {"image": images, "tokens": tokens, "valid": valid, "reason": reason.astype(str),
                "key": np.asarray(batch["key"]).astype(str), "source": np.asarray(batch["source"], np.int64),
                "index": np.asarray(batch["index"], np.int64), **out}

    def _image(self, data: bytes, index: int) -> np.ndarray:
        img = Image.open(io.BytesIO(data))
        if self.augment is None:
            return preprocess_eval(img, self.size)
        return preprocess_train(img, self.size, self.augment.rng(index), crop_scale=self.augment.crop_scale,
                                hflip=self.augment.hflip)


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
    for k in ("image_bytes", "caption", "meta", "reason", "key"):
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]  # element-wise: keeps bytes objects intact
        cols[k] = col
    cols["valid"] = np.array([r["valid"] for r in rows], dtype=bool)
    cols["source"] = np.array([r["source"] for r in rows], dtype=np.int64)
    cols["index"] = np.array([r["index"] for r in rows], dtype=np.int64)
    return cols


def label_settings(cfg: DataConfig) -> tuple[str, int, int] | None:
    """(json field, num_classes, max_labels) the decoder checks labels with; None for image-text pairs.
    `num_classes` must be resolved by then (`launch.preflight` reads it from the manifest when null)."""
    if cfg.labels is None:
        return None
    if cfg.labels.num_classes is None:
        raise ValueError("data.labels.num_classes is unresolved (resolve_num_classes runs in preflight)")
    return cfg.labels.field, cfg.labels.num_classes, cfg.labels.max_labels


def build_dataset(
    cfg: DataConfig, *, epoch: int = 0, train: bool = True, rank: int = 0, world_size: int = 1
) -> ray.data.Dataset:
    """This rank's rows of one epoch as a lazy Ray Dataset (see the module docstring for the order).

    `train=False` switches to the eval transform (resize + centre crop); the order still follows
    `epoch`. Build one dataset per epoch and per worker; its decode tasks run in Ray's pooled
    worker processes, so a new epoch starts in well under a second once they are warm.
    """
    tok = tokenizer_path(cfg) if cfg.labels is None else None
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
            "tokenizer": None if tok is None else str(tok), "image_size": cfg.image_size,
            "context_length": cfg.context_length, "train": train, "augment": cfg.augment,
            "crop_scale": tuple(cfg.crop_scale), "hflip": cfg.hflip, "seed": cfg.seed, "epoch": epoch,
            "labels": label_settings(cfg),
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
    names = ("image", "tokens", "valid", "reason", "key", "source", *(("labels",) if cfg.labels else ()))
    for batch in build_dataset(cfg, epoch=0).iter_batches(batch_size=cfg.decode_batch_size,
                                                          batch_format="numpy"):
        where = rows[np.asarray(batch["index"], dtype=np.int64)]
        for k in names:
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
