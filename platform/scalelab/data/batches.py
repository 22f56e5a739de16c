"""Worker-side batching: exact-size training batches from the pipeline's rows, bad rows counted.

Ray-free (it consumes anything with `iter_batches`, or plain row / column dicts), so the training
loop and the tests can use it without starting Ray. `scalelab.data.pipeline` re-exports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where batches are made
    import torch

__all__ = ["Batch", "TrainBatchIterator", "iter_train_batches"]


@dataclass
class Batch:
    """A training batch of exactly `batch_size` valid samples."""

    images: torch.Tensor  # float32 [B, 3, S, S], CLIP-normalised
    tokens: torch.Tensor  # int64 [B, L], 0 = padding ([B, 0] for labelled data)
    keys: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None  # int64 [B, max_labels]: class indices, -1 padding (labelled data)


def _column_batches(source: Any, chunk: int) -> Iterator[dict[str, np.ndarray]]:
    """numpy column batches from a Ray Dataset / DataIterator, or from an iterable of row or column dicts."""
    if hasattr(source, "iter_batches"):
        yield from source.iter_batches(batch_size=chunk, batch_format="numpy")
        return
    for item in source:
        if np.ndim(item["valid"]) == 0:  # one row: make it a batch of one
            item = {k: np.asarray(v)[None] if not isinstance(v, (str, bytes)) else np.asarray([v])
                    for k, v in item.items()}
        yield item


class TrainBatchIterator(Iterator[Batch]):
    """Batches of exactly `batch_size` valid samples (drop_last); bad rows are dropped and counted.

    `start_sample=k` skips the first k valid samples of the epoch's order, so `(epoch, samples_seen)`
    from a checkpoint resumes the order exactly. `samples_seen` counts valid samples consumed in the
    epoch, including those skipped on resume (store it in the checkpoint as is). `skipped` counts bad
    rows by reason from the resume point on; `metrics()` names them `data/skipped/<reason>`.
    Raises RuntimeError at the end when the epoch held no usable sample at all.
    """

    def __init__(self, source: Any, batch_size: int, *, start_sample: int = 0) -> None:
        if batch_size <= 0 or start_sample < 0:
            raise ValueError(f"need batch_size > 0 and start_sample >= 0, got {batch_size}, {start_sample}")
        self.batch_size = batch_size
        self.samples_seen = start_sample
        self.skipped: dict[str, int] = {}
        self._start = start_sample
        self._rows = 0
        self._valid = 0
        self._gen = self._batches(source)

    def __next__(self) -> Batch:
        return next(self._gen)

    def close(self) -> None:
        """Stop reading mid-epoch: ends the source's iteration (a Ray Data execution releases its tasks)."""
        self._gen.close()

    def metrics(self) -> dict[str, int]:
        return {f"data/skipped/{reason}": n for reason, n in sorted(self.skipped.items())}

    def _batches(self, source: Any) -> Iterator[Batch]:
        import torch

        parts: list[dict[str, np.ndarray]] = []
        held = 0
        for cols in _column_batches(source, self.batch_size):
            keep = self._keep(cols)
            if not keep.any():
                continue
            parts.append({k: cols[k][keep] for k in ("image", "tokens", "key", "labels") if k in cols})
            held += int(keep.sum())
            while held >= self.batch_size:
                merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                b = self.batch_size
                rest = {k: v[b:] for k, v in merged.items()}
                parts, held = ([rest] if len(rest["key"]) else []), held - b
                self.samples_seen += b
                labels = merged.get("labels")
                yield Batch(torch.from_numpy(np.ascontiguousarray(merged["image"][:b], dtype=np.float32)),
                            torch.from_numpy(np.ascontiguousarray(merged["tokens"][:b], dtype=np.int64)),
                            [str(k) for k in merged["key"][:b]],
                            None if labels is None else torch.from_numpy(np.ascontiguousarray(labels[:b])))
        if self._valid == 0:
            raise RuntimeError(
                f"no usable samples: {self._rows} rows read, all bad or unreadable (skipped: {self.skipped})"
            )

    def _keep(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        """Mask of the valid rows past the resume point; counts the rest."""
        valid = np.asarray(cols["valid"], dtype=bool)
        self._rows += len(valid)
        before = np.cumsum(valid) + self._valid  # valid samples up to and including each row
        self._valid = int(before[-1]) if len(before) else self._valid
        # Resuming after k valid samples: rows up to the k-th were consumed (and counted) before.
        for reason in np.asarray(cols["reason"])[~valid & (before >= self._start)]:
            self.skipped[str(reason)] = self.skipped.get(str(reason), 0) + 1
        return valid & (before > self._start)


def iter_train_batches(source: Any, batch_size: int, *, start_sample: int = 0) -> TrainBatchIterator:
    """Worker-side batches from `build_dataset(...)` (or its `get_dataset_shard` iterator, or rows)."""
    return TrainBatchIterator(source, batch_size, start_sample=start_sample)
