"""The task seam of the worker loop: what one training step is, and what the loop may ask of it.

The loop (`loop.py`) calls a task without knowing which it is: `step(batch, step)` → metrics,
`save`/`load` of its share of a checkpoint, and `full_weights()` for evaluation. Today there is one
task, the gradient-cache contrastive step through a DeepSpeed engine; a supervised image-tower step
(BASIC's first stage) is the next one. Distribution stays inside: ZeRO gathering for evaluation,
the engine's checkpoint format, the seeds that make every rank start from the same parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from scalelab.config import ExperimentConfig
from scalelab.train.checkpoint import RankState, RunState, load_checkpoint, save_checkpoint
from scalelab.train.engine import build_engine, fp32_master, zero_stage
from scalelab.train.image_tower import prepare_model
from scalelab.train.step import train_step

__all__ = ["ContrastiveTask", "make_task"]


class ContrastiveTask:
    """A dual encoder trained with the cached contrastive step under DeepSpeed ZeRO."""

    def __init__(self, cfg: ExperimentConfig, rank: int, world: int) -> None:
        from scalelab.models import create_model

        self.cfg, self.rank, self.world = cfg, rank, world
        torch.manual_seed(cfg.train.seed)  # identical initial parameters on every rank
        model = create_model(cfg.model.preset, **cfg.model.overrides)
        # Pretrained image weights (every rank reads them) and the tower's lock, before ZeRO partitions
        # the parameters and builds the optimizer's groups.
        prepare_model(model, cfg)
        self.engine, _ = build_engine(model, cfg, world_size=world)
        torch.manual_seed(cfg.train.seed * 7919 + 1 + rank)  # dropout noise differs between ranks

    def step(self, batch: Any, step: int) -> dict[str, float | None]:
        """One optimizer step on this rank's rows (`step` = steps already taken: it selects the lr)."""
        return train_step(self.engine, batch.images, batch.tokens, self.cfg, step=step)

    def save(self, directory: str | Path, run: RunState, mine: RankState) -> None:
        """This rank's share of a checkpoint (every rank calls it: ZeRO state is partitioned)."""
        save_checkpoint(self.engine, directory, run, mine, self.rank)

    def load(self, directory: str | Path) -> tuple[RunState, RankState]:
        """Restore the engine and this rank's RNG from a checkpoint; returns the run and rank states."""
        run, mine = load_checkpoint(self.engine, directory, self.rank, self.world)
        if mine.torch_rng is not None:
            torch.set_rng_state(mine.torch_rng)
        if mine.cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine.cuda_rng)
        return run, mine

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[dict[str, torch.Tensor] | None]:
        """The weights `scalelab export` would write, on rank 0 (None elsewhere): the optimizer's fp32
        master copies where there are any (ZeRO-1/2/3, and ZeRO-0 bf16: `engine.fp32_master`), else the
        module's own parameters (ZeRO-0 fp32, frozen parameters), so evaluation scores what an export
        holds. Collective: reading a full master (all-reduce / ZeRO-3 gather) needs every rank."""
        import deepspeed

        params = dict(self.engine.module.named_parameters())
        masters = {name: fp32_master(self.engine, p) for name, p in params.items()}
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero_stage(self.engine) == 3):
            if self.rank != 0:
                yield None
                return
            weights = dict(self.engine.module.state_dict())  # buffers, and parameters without a master
            weights.update({name: m for name, m in masters.items() if m is not None})
            yield weights


def make_task(cfg: ExperimentConfig, rank: int, world: int) -> ContrastiveTask:
    """The task the experiment asks for (`cfg.task`): contrastive, or classify (train/classify.py)."""
    if cfg.task == "classify":
        from scalelab.train.classify import ClassifyTask  # it builds on this module's ContrastiveTask

        return ClassifyTask(cfg, rank, world)
    return ContrastiveTask(cfg, rank, world)
