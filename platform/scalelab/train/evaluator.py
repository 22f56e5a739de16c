"""Evaluation inside training: when, on which weights, and what a failure does. Zero-shot and retrieval
for the contrastive task; top-1 on held-out labelled splits (`classify.eval_sets`) for task classify.

Rank 0 holds an fp32 copy of the model and the tokenizer and evaluates the weights `scalelab export`
would write (the task gathers them: `ContrastiveTask.full_weights`). An evaluation that raises — an
eval image gone bad after preflight, say — would fail the same way after a restart, so it is not
raised where it happens: every rank agrees on it (an all-reduce) and raises `RunStopped` at the same
step, which ends the run once (train/failures.py).
"""

from __future__ import annotations

from typing import Any

import torch

from scalelab.config import ExperimentConfig
from scalelab.train.failures import RunStopped
from scalelab.train.stream import all_ranks_true

__all__ = ["Evaluator"]


class Evaluator:
    """`maybe_run(step, task)` on every rank: the metrics on rank 0 (None elsewhere or when not due)."""

    def __init__(self, cfg: ExperimentConfig, rank: int) -> None:
        self.cfg = cfg
        self.classify = cfg.task == "classify"
        wanted = cfg.classify.eval_sets if self.classify else (cfg.eval.sets or cfg.eval.retrieval)
        self.enabled = bool(wanted)
        self.model: Any = None
        if self.enabled and rank == 0 and self.classify:
            from scalelab.models import model_for

            with torch.random.fork_rng(devices=[]):  # as below: the training RNG must not move
                self.model = model_for(cfg).float().eval()
        elif self.enabled and rank == 0:
            from scalelab.data.tokenizer import load_tokenizer, tokenizer_path
            from scalelab.models import create_model

            # Building a model draws from the global RNG; its weights are replaced before every use, so
            # it must not move the training RNG (dropout after a resume would differ from the original).
            with torch.random.fork_rng(devices=[]):
                self.model = create_model(cfg.model.preset, **cfg.model.overrides).float().eval()
            self.tokenizer = load_tokenizer(tokenizer_path(cfg.data))

    def due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return self.enabled and (step == self.cfg.train.steps or bool(every and step % every == 0))

    def maybe_run(self, step: int, task: Any) -> dict[str, float] | None:
        """Evaluate when due (collective: every rank calls it at every step)."""
        if not self.due(step):
            return None
        with task.full_weights() as weights:  # None on ranks > 0; gathering needs every rank
            outcome = self._run(weights) if self.model is not None else None
        failed = isinstance(outcome, Exception)
        if all_ranks_true(not failed):
            return outcome  # type: ignore[return-value]
        reason = f"evaluation failed: {type(outcome).__name__}: {outcome}" if failed else "evaluation failed"
        raise RunStopped(reason.splitlines()[0], kind="eval")

    def _run(self, weights: dict[str, torch.Tensor]) -> dict[str, float] | Exception:
        from scalelab.eval import evaluate_classifier, evaluate_retrieval, evaluate_sets

        try:  # local to rank 0 (no collectives inside): returned, so every rank leaves the gather alike
            shapes = self.model.state_dict()
            self.model.load_state_dict({k: v.float().reshape(shapes[k].shape) for k, v in weights.items()})
            e = self.cfg.eval
            if self.classify:
                return evaluate_classifier(self.model, self.cfg.classify.eval_sets, self.cfg.data.image_size,
                                           batch_size=e.batch_size)
            out = evaluate_sets(self.model, self.tokenizer, e.sets, shifted=e.shifted,
                                batch_size=e.batch_size, templates=e.templates)
            if e.retrieval:
                out.update(evaluate_retrieval(self.model, self.tokenizer, e.retrieval,
                                              batch_size=e.batch_size))
            return out
        except Exception as err:
            return err
