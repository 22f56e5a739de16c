"""The supervised image-tower task (`task: classify`, BASIC's first stage): image tower + linear head on
labelled images, one plain step through the same DeepSpeed engine, checkpoints and evaluation seam.

`classify_step` = set the scheduled lr → for each micro-batch: `engine(images)` → per-sample loss
(`scalelab.losses.classify_loss`) → `engine.backward(sum / per-rank batch, scale_wrt_gas=False)` → one
`optimizer_step`. What makes it exact:

- The per-rank batch is split into `batch_geometry(...).backward_calls` micro-batches (each at most
  `train.micro_batch_size` rows), the number the DeepSpeed config's `gradient_accumulation_steps`
  was built with; the accumulation boundary is set on the last one only (ZeRO-1/2 reduce there).
- Each micro-batch's loss is its per-sample sum divided by the per-rank batch, not its own size, so
  the sum over micro-batches is the per-rank mean, and DeepSpeed's average over ranks the global mean
  (DeepSpeed must not divide again: `scale_wrt_gas=False`).
- `engine(images)` (rather than the module) does the per-micro-step bookkeeping ZeRO-3 needs and
  casts the images under bf16; the loss is computed in fp32.
- A NaN/inf loss gives a NaN/inf gradient norm: `optimizer_step` then skips the update on every rank
  and discards the gradients (`train/skipped` = 1.0), as for the contrastive step.

Metrics (stable keys): `train/loss` (global-batch mean, same on every rank), `train/accuracy` (top-1
on the training batch: the top class is one of the sample's labels), `train/lr`, `train/grad_norm`,
`train/skipped`, `train/time/forward_backward_s`, `train/time/optimizer_s`, `train/time/total_s`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from scalelab.config import ExperimentConfig
from scalelab.losses import classify_loss, top1_correct
from scalelab.train.ds_config import batch_geometry
from scalelab.train.engine import build_engine, optimizer_step
from scalelab.train.schedule import apply_lr, lr_for
from scalelab.train.task import ContrastiveTask

__all__ = ["ClassifyTask", "classify_step"]


class ClassifyTask(ContrastiveTask):
    """An `ImageClassifier` trained with `classify_step` under DeepSpeed ZeRO.

    Only the model and the step differ from the contrastive task: the engine-level `save`, `load`
    and `full_weights` (checkpoint format, RNG restore, ZeRO gathering for evaluation and export) are
    the same code, inherited.
    """

    def __init__(self, cfg: ExperimentConfig, rank: int, world: int) -> None:
        from scalelab.models import model_for

        self.cfg, self.rank, self.world = cfg, rank, world
        torch.manual_seed(cfg.train.seed)  # identical initial parameters on every rank
        self.engine, _ = build_engine(model_for(cfg), cfg, world_size=world)
        torch.manual_seed(cfg.train.seed * 7919 + 1 + rank)  # dropout noise differs between ranks

    def step(self, batch: Any, step: int) -> dict[str, float | None]:
        if batch.labels is None:
            raise ValueError("task classify got a batch without labels (data.labels is not set?)")
        return classify_step(self.engine, batch.images, batch.labels, self.cfg, step=step)


def classify_step(engine: Any, images: Tensor, labels: Tensor, cfg: ExperimentConfig, *,
                  step: int) -> dict[str, float | None]:
    """One optimizer step on this rank's rows (`step` = steps already taken: it selects the lr)."""
    t_start = time.perf_counter()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    geometry = batch_geometry(cfg.train, world)
    rows = geometry.per_rank_batch
    if images.shape[0] != rows or labels.shape[0] != rows:
        raise ValueError(f"this rank got {images.shape[0]} images / {labels.shape[0]} labels, expected "
                         f"train.global_batch / world = {cfg.train.global_batch} / {world} = {rows}")
    lr = lr_for(step, cfg.optim, cfg.train.steps)
    apply_lr(engine.optimizer, lr)
    calls = geometry.backward_calls
    sums = torch.zeros(2, dtype=torch.float64)  # loss sum, correct count over this rank's rows
    for k, (x, y) in enumerate(zip(images.tensor_split(calls), labels.tensor_split(calls), strict=True)):
        x, y = x.to(engine.device), y.to(engine.device)
        engine.set_gradient_accumulation_boundary(k == calls - 1)
        logits = engine(x)
        per_sample = classify_loss(logits, y, cfg.classify.head)
        engine.backward(per_sample.sum() / rows, scale_wrt_gas=False)
        sums += torch.stack([per_sample.detach().double().sum().cpu(),
                             top1_correct(logits.detach(), y).double().sum().cpu()])
    t0 = time.perf_counter()
    outcome = optimizer_step(engine)
    t_opt = time.perf_counter() - t0
    if world > 1:  # the reported loss and accuracy are the global batch's, the same on every rank
        totals = sums.to(engine.device)
        torch.distributed.all_reduce(totals)
        sums = totals.cpu()
    return {
        "train/loss": float(sums[0]) / cfg.train.global_batch,
        "train/accuracy": float(sums[1]) / cfg.train.global_batch,
        "train/lr": lr,
        "train/grad_norm": outcome.grad_norm,
        "train/skipped": 0.0 if outcome.applied else 1.0,
        "train/time/forward_backward_s": t0 - t_start,
        "train/time/optimizer_s": t_opt,
        "train/time/total_s": time.perf_counter() - t_start,
    }
