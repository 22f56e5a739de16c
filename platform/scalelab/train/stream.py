"""A rank's training batches across epochs, with the epoch switch agreed by every rank.

Each rank reads its own share of the epoch order (`data.plan`) and drops its own bad rows, so one rank
may run out of full batches a step before another. Before each step the ranks all-reduce "I have a
batch" (MIN); if any rank has none, all move to the next epoch together. An epoch that gives some rank
no full batch at all ends the run once (`RunStopped`: more epochs would not change it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scalelab.config import ExperimentConfig
from scalelab.data.pipeline import build_dataset, iter_cached_epoch, iter_train_batches
from scalelab.data.subset_cache import cached_decode
from scalelab.train.checkpoint import RankState
from scalelab.train.ds_config import batch_geometry
from scalelab.train.failures import RunStopped

__all__ = ["DataStream", "all_ranks_true", "quiet_data_progress", "subset_cache_dir"]


class DataStream:
    """This rank's batches, resumable from a `RankState` (epoch, samples consumed, bad-row counts)."""

    def __init__(self, cfg: ExperimentConfig, rank: int, world: int, state: RankState) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.batch = batch_geometry(cfg.train, world).per_rank_batch
        self.epoch = state.epoch
        self._carried = dict(state.skipped)  # counts of earlier epochs / before the restart
        self._cached: Any = None
        self._open(state.epoch_samples)

    def _open(self, start: int) -> None:
        data = self.cfg.data
        if data.cache:  # decoded once (or found on disk); every epoch then reorders it in memory
            if self._cached is None:
                self._cached = cached_decode(data, subset_cache_dir(self.cfg))
            rows = iter_cached_epoch(self._cached, data, self.epoch, rank=self.rank, world_size=self.world)
            self._it = iter_train_batches(rows, self.batch, start_sample=start)
            return
        ds = build_dataset(data, epoch=self.epoch, train=True, rank=self.rank, world_size=self.world)
        self._it = iter_train_batches(ds, self.batch, start_sample=start)

    def next(self) -> Any:
        """The next batch; every rank calls it at every step (it holds a collective)."""
        for attempt in range(2):
            try:
                batch = next(self._it)
            except StopIteration:
                batch = None
            if all_ranks_true(batch is not None):
                return batch
            if attempt:  # agreed by all ranks: every rank stops here
                raise RunStopped(
                    f"epoch {self.epoch} gives some rank no full batch of {self.batch} valid samples "
                    f"(bad samples so far: {self._skipped() or 'none'}): data.n_pairs="
                    f"{self.cfg.data.n_pairs} is too small for train.global_batch="
                    f"{self.cfg.train.global_batch} on {self.world} workers", kind="data")
            self._carried = self._skipped()
            self.epoch += 1
            self._open(0)
        raise AssertionError("unreachable")

    def _skipped(self) -> dict[str, int]:
        out = dict(self._carried)
        for reason, n in self._it.skipped.items():
            out[reason] = out.get(reason, 0) + n
        return out

    def close(self) -> None:
        """Stop mid-epoch (the current epoch's Ray Data execution ends instead of lingering)."""
        self._it.close()

    def state(self) -> RankState:
        """This rank's position and randomness, for its share of a checkpoint."""
        return RankState(epoch=self.epoch, epoch_samples=self._it.samples_seen, skipped=self._skipped(),
                         torch_rng=torch.get_rng_state(),
                         cuda_rng=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)

    def skipped_totals(self) -> dict[str, int]:
        """Bad rows by reason over all ranks and the whole run (collective)."""
        gathered: list[dict[str, int]] = [{} for _ in range(self.world)]
        if self.world > 1:
            dist.all_gather_object(gathered, self._skipped())
        else:
            gathered = [self._skipped()]
        total: dict[str, int] = {}
        for part in gathered:
            for reason, n in part.items():
                total[reason] = total.get(reason, 0) + n
        return {f"data/skipped/{reason}": n for reason, n in sorted(total.items())}


def subset_cache_dir(cfg: ExperimentConfig) -> Path | None:
    """Where decoded subsets are kept between runs (`data/subset_cache.py`): beside the runs on a local
    `run.storage`, shared by a sweep's trials; None (no disk cache) on a remote filesystem URI."""
    if "://" in cfg.run.storage:
        return None
    return Path(cfg.run.storage) / ".cache" / "decoded"


def all_ranks_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on every rank (an all-reduce MIN; local without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def quiet_data_progress() -> None:
    """Every epoch starts a Ray Data execution per worker: its progress bars would drown the progress line."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
