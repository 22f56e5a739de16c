"""Non-finite steps are skipped on every rank, counted, and stop the run after too many in a row.

The claim, on 2 Ray Train workers under ZeRO-0 and ZeRO-2 (one worker group, both stages in turn, as in
test_engine.py): after one good step, a step whose images hold a NaN on rank 1 only (so rank 0's own
embeddings are finite: the ranks must agree, or one waits in a collective forever), and a step whose
loss is finite but one parameter's gradient is inf on rank 1 only (a gradient hook: the inf reaches
the gradient and nothing else), leave every rank's module parameters, fp32 master copies and
optimizer state (Adam moments and step counts) bit-identical (`torch.equal`). The next good step then
trains, and gives exactly what a reference run that never saw the two bad batches gives — so neither a
stale accumulated gradient nor a shifted DeepSpeed counter survived the skips. Gradient clipping is
on: a naive step with an inf norm would clip the gradient to zero and still move Adam's moments and
decay the weights.

`NonFiniteGuard` (the policy: count, stop after `train.max_skipped_steps` in a row) is tested without
Ray against a naive reading of the rule on random skip sequences.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from scalelab.config import ExperimentConfig, validate
from scalelab.train.step import NonFiniteGuard, NonFiniteRunError

from .compare import differences

WORLD = 2
GLOBAL_BATCH = 8  # 4 rows per rank, micro-batches of 2: two backward calls per step
STAGES = (0, 2)
POISONED = "text_tower.proj.weight"  # its gradient becomes inf on rank 1 in the "inf" step


# --------------------------------------------------------------------------- the policy, no Ray
def _first_raise(flags: list[bool], max_consecutive: int) -> int | None:
    """Naive rule: the first index that ends more than `max_consecutive` skipped steps in a row."""
    text = "".join("x" if f else "." for f in flags)
    found = text.find("x" * (max_consecutive + 1))
    return None if found < 0 else found + max_consecutive


@pytest.mark.parametrize("max_consecutive", [0, 1, 3])
def test_guard_matches_the_naive_rule(max_consecutive):
    rnd = random.Random(max_consecutive)
    for _ in range(200):
        flags = [rnd.random() < 0.5 for _ in range(rnd.randint(0, 12))]
        guard, raised_at = NonFiniteGuard(max_consecutive), None
        for i, flag in enumerate(flags):
            try:
                guard.observe(flag, step=i + 1)
            except NonFiniteRunError:
                raised_at = i
                break
        assert raised_at == _first_raise(flags, max_consecutive), flags
        seen = flags if raised_at is None else flags[: raised_at + 1]
        assert guard.total == sum(seen)
        assert guard.metrics() == {"train/skipped_steps": sum(seen)}


def test_guard_message_names_the_count_the_step_and_the_setting():
    guard = NonFiniteGuard(2)
    for step, flag in enumerate([True, False, True, True], start=1):
        guard.observe(flag, step=step)
    with pytest.raises(NonFiniteRunError) as error:
        guard.observe(True, step=5)
    text = str(error.value)
    assert "3 consecutive training step(s), ending at step 5" in text
    assert "4 skipped in this run" in text
    assert "train.max_skipped_steps=2" in text and "optim.lr" in text and "data" in text
    assert isinstance(error.value, RuntimeError)


def test_guard_state_survives_a_checkpoint():
    guard = NonFiniteGuard(2)
    for flag in [True, False, True, True]:
        guard.observe(flag, step=0)
    state = guard.state_dict()
    assert state == {"total": 3, "consecutive": 2}
    assert all(type(v) is int for v in state.values())
    resumed = NonFiniteGuard(2)
    resumed.load_state_dict(copy.deepcopy(state))
    with pytest.raises(NonFiniteRunError, match="3 consecutive"):  # the run of two carries over
        resumed.observe(True, step=5)


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_guard_refuses_a_bad_limit(bad):
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(bad)


# --------------------------------------------------------------------------- 2 workers, ZeRO-0 and -2
def _config(stage: int) -> ExperimentConfig:
    return validate(ExperimentConfig, {
        "name": f"nonfinite-zero{stage}",
        "model": {"preset": "micro"},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 0, "grad_clip": 0.5},
        "train": {"global_batch": GLOBAL_BATCH, "micro_batch_size": 2, "steps": 4, "seed": 5,
                  "precision": "fp32", "zero_stage": stage, "num_workers": WORLD},
    })


def _batches(cfg: ExperimentConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two good global batches `a`, `c`, and `nan`: `c` with one NaN pixel in a row of rank 1."""
    from scalelab.models import get_spec

    spec = get_spec(cfg.model.preset)
    g = torch.Generator().manual_seed(cfg.train.seed + 1)
    out = {}
    for name in ("a", "c"):
        images = torch.randn(GLOBAL_BATCH, 3, spec.image_size, spec.image_size, generator=g)
        tokens = torch.randint(1, spec.vocab_size, (GLOBAL_BATCH, spec.context_length), generator=g)
        tokens[:, spec.context_length // 2 :] = 0
        out[name] = (images, tokens)
    images = out["c"][0].clone()
    images[GLOBAL_BATCH - 1, 1, 2, 3] = float("nan")  # the last row belongs to rank 1
    out["nan"] = (images, out["c"][1])
    return out


def _engine(cfg: ExperimentConfig, world: int):
    from scalelab.models import create_model
    from scalelab.train.engine import build_engine

    torch.manual_seed(cfg.train.seed)  # the same initial parameters in both runs and on both ranks
    return build_engine(create_model(cfg.model.preset).train(), cfg, world_size=world)[0]


def _snapshot(engine) -> dict:
    """This rank's module parameters, full fp32 masters (None at ZeRO-0) and raw optimizer state."""
    import deepspeed

    from scalelab.train.engine import zero_stage

    params = list(engine.module.named_parameters())
    masters = {n: deepspeed.utils.safe_get_full_fp32_param(p) for n, p in params}  # collective
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero_stage(engine) == 3):
        module = {n: p.detach().clone() for n, p in params}
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # under ZeRO's wrapper
    # The raw per-tensor state (ZeRO-3 empties the param groups between steps, so no state_dict()),
    # in the optimizer's own order, which is the same in every run.
    state = {i: copy.deepcopy(s) for i, s in enumerate(torch_optimizer.state.values())}
    return {"module": module, "master": copy.deepcopy(masters), "optimizer": state}


def _train_fn(config: dict) -> None:
    torch.set_num_threads(1)
    for stage, out in config["stages"].items():
        _run_stage(_config(stage), out)


def _run_stage(cfg: ExperimentConfig, out: str) -> None:
    """Guarded run a, nan, inf, c; reference run a, c (same step indices, hence the same lr)."""
    import ray.train

    from scalelab.train.step import train_step

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    batches = _batches(cfg)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    record: dict = {"metrics": {}, "reference_metrics": {}}

    def step(engine, name, batch, index, into="metrics"):
        images, tokens = batches[batch]
        record[into][name] = train_step(engine, images[rows], tokens[rows], cfg, step=index)

    engine = _engine(cfg, world)
    step(engine, "a", "a", 0)
    record["before"] = _snapshot(engine)
    step(engine, "nan", "nan", 1)
    record["after_nan"] = _snapshot(engine)
    param = dict(engine.module.named_parameters())[POISONED]
    hook = param.register_hook(lambda g: torch.full_like(g, float("inf")) if rank == 1 else g)
    step(engine, "inf", "c", 1)
    hook.remove()
    record["after_inf"] = _snapshot(engine)
    step(engine, "c", "c", 1)
    record["after"] = _snapshot(engine)
    record["engine_skipped_steps"] = engine.skipped_steps
    del engine

    reference = _engine(cfg, world)
    step(reference, "a", "a", 0, into="reference_metrics")
    step(reference, "c", "c", 1, into="reference_metrics")
    record["reference"] = _snapshot(reference)
    torch.save(record, f"{out}.rank{rank}")


@pytest.fixture(scope="module")
def records(ray_cluster, tmp_path_factory) -> dict[int, list[dict]]:
    """One Ray Train run, 2 workers, the stages in turn; stage → every rank's record."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    folder = tmp_path_factory.mktemp("nonfinite")
    outs = {stage: str(folder / f"zero{stage}") for stage in STAGES}
    TorchTrainer(
        _train_fn,
        train_loop_config={"stages": outs},
        # 0.5 CPU each: two 1-CPU workers on a 2-CPU cluster leave nothing for Ray's own tasks.
        scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            name="nonfinite-stages",
            storage_path=str(folder),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}},
        ),
    ).fit()
    return {stage: [torch.load(f"{out}.rank{r}") for r in range(WORLD)] for stage, out in outs.items()}


CASES = [(stage, rank) for stage in STAGES for rank in range(WORLD)]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("stage", "rank"), CASES)
def test_skipped_steps_change_nothing_on_any_rank(stage, rank, records):
    record = records[stage][rank]
    metrics = record["metrics"]
    assert metrics["a"]["train/skipped"] == 0.0
    assert metrics["nan"]["train/skipped"] == 1.0
    assert math.isnan(metrics["nan"]["train/loss"])  # reported as computed, on rank 0 too
    assert metrics["inf"]["train/skipped"] == 1.0
    assert not math.isfinite(metrics["inf"]["train/grad_norm"])
    # the loss was finite, and equals the next step's on the same batch: the parameters did not move
    assert math.isfinite(metrics["inf"]["train/loss"])
    assert metrics["inf"]["train/loss"] == metrics["c"]["train/loss"]
    assert not differences(record["after_nan"], record["before"])
    assert not differences(record["after_inf"], record["before"])
    assert record["before"]["optimizer"], "the optimizer has state to compare (Adam moments, step)"
    if stage:
        assert all(m is not None for m in record["before"]["master"].values())  # ZeRO's fp32 copies
    assert record["engine_skipped_steps"] == 1  # DeepSpeed's own counter, ZeRO-0 included


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("stage", "rank"), CASES)
def test_training_continues_as_if_the_bad_batches_never_came(stage, rank, records):
    record = records[stage][rank]
    got, want = record["metrics"]["c"], record["reference_metrics"]["c"]
    assert got["train/skipped"] == 0.0 and math.isfinite(got["train/loss"])
    assert (got["train/loss"], got["train/grad_norm"]) == (want["train/loss"], want["train/grad_norm"])
    before, after = record["before"]["module"], record["after"]["module"]
    still = [name for name, p in after.items() if torch.equal(p, before[name])]
    assert not still, f"parameters that did not train on the good step: {still}"
    assert not differences(record["after"], record["reference"])
