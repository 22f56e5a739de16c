"""DeepSpeed engine + gradient-cache step, 2 Ray Train workers on 2 nodes, vs. a plain single-process
reference.

The claim: `train_step` on 2 data-parallel ranks, each running several (uneven) gradient-cache
micro-batches through `engine.backward(..., scale_wrt_gas=False)` with the accumulation boundary on
the last one, then one `engine.step()`, yields the same parameters as one plain full-batch step
(`contrastive_loss` over the whole global batch, one `loss.backward()`, the same torch AdamW with
weight decay and gradient clipping, `clamp_()`). Two steps, so the second starts from DeepSpeed's own
fp32 master state (lr schedule, Adam moments, clipping and the master-copy clamp all carried over):
logit_scale starts above ln 100, so step 1 is clamped and a clamp that missed the master copy shows
in step 2. fp32 throughout; dropout 0 (ranks would draw independent noise).

Stages 0, 1, 2, 3, one after the other in the same two workers (one worker-group start-up for all
four; each stage builds its own engine from a fresh model). The workers run on two nodes of a real
multi-node Ray cluster (`conftest.LocalCluster`: a head and two worker nodes, each its own raylet), one
rank per node (`STRICT_SPREAD`), so the collectives cross nodes as on a cluster.
The pre-clip global gradient norm is compared as well (rel 1e-5): AdamW's update is nearly invariant
to a constant gradient factor, so parameters alone would miss one.
Tolerance: max |p_deepspeed - p_reference| <= 1e-6 over all parameters (fp32 reduction-order noise
is ~1e-8 here; a wrong gradient scale, boundary or clamp gives differences of order lr = 1e-3).
"""

from __future__ import annotations

import math

import pytest
import torch

from scalelab.config import MAX_LOGIT_SCALE, ExperimentConfig, validate

WORLD = 2
GLOBAL_BATCH = 24  # 12 rows per rank: image micro-batches 5+5+2, text micro-batches 7+5
STEPS = 2
TOLERANCE = 1e-6


def _config(stage: int) -> ExperimentConfig:
    return validate(ExperimentConfig, {
        "name": f"engine-zero{stage}",
        "model": {"preset": "micro", "overrides": {"init_logit_scale": MAX_LOGIT_SCALE + 0.3}},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 0, "grad_clip": 0.5},
        "train": {"global_batch": GLOBAL_BATCH, "micro_batch_size": 5, "text_micro_batch_size": 7,
                  "steps": STEPS, "seed": 3, "precision": "fp32", "zero_stage": stage,
                  "num_workers": WORLD},
    })


def _model_and_batches(cfg: ExperimentConfig):
    """Same initial parameters and the same STEPS global batches in every process (seeded)."""
    from scalelab.models import create_model

    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.preset, **cfg.model.overrides).train()
    spec = model.config
    g = torch.Generator().manual_seed(cfg.train.seed + 1)
    batches = []
    for _ in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, spec.image_size, spec.image_size, generator=g)
        tokens = torch.randint(1, spec.vocab_size, (GLOBAL_BATCH, spec.context_length), generator=g)
        tokens[:, spec.context_length // 2 :] = 0
        batches.append((images, tokens))
    return model, batches


def _train_fn(config: dict) -> None:
    """The Ray Train worker: where it runs, then every stage in turn (see `_train_stage`)."""
    import ray
    import ray.train

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    with open(f"{config['nodes']}.{rank}", "w") as f:
        f.write(ray.get_runtime_context().get_node_id())
    for stage, out in config["stages"].items():
        _train_stage(_config(stage), out)


def _train_stage(cfg: ExperimentConfig, out: str) -> None:
    """One engine, STEPS cached steps on this rank's half, rank 0 saves."""
    import deepspeed
    import ray.train

    from scalelab.train.engine import build_engine, zero_stage
    from scalelab.train.step import train_step

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    model, batches = _model_and_batches(cfg)
    engine, _ = build_engine(model, cfg, world_size=world)
    assert zero_stage(engine) == cfg.train.zero_stage
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    metrics = [train_step(engine, images[rows], tokens[rows], cfg, step=s)
               for s, (images, tokens) in enumerate(batches)]

    params = list(engine.module.named_parameters())
    # fp32 master copies (None where the optimizer steps the parameters themselves); collective
    master = {n: deepspeed.utils.safe_get_full_fp32_param(p) for n, p in params}
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero_stage(engine) == 3):
        module = {n: p.detach().clone() for n, p in params}
    if rank == 0:
        torch.save({"module": module, "master": master, "metrics": metrics}, out)


def _reference(cfg: ExperimentConfig) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """Plain torch, one process: full-batch loss, one backward, clip, AdamW step, clamp."""
    from scalelab.losses import contrastive_loss
    from scalelab.train.optim import build_optimizer
    from scalelab.train.schedule import apply_lr, lr_for

    model, batches = _model_and_batches(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    losses, norms = [], []
    for step, (images, tokens) in enumerate(batches):
        apply_lr(optimizer, lr_for(step, cfg.optim, cfg.train.steps))
        optimizer.zero_grad(set_to_none=True)
        logit_scale, _ = model.temperature()
        loss = contrastive_loss(model.encode_image(images), model.encode_text(tokens), logit_scale.exp())
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item())
        optimizer.step()
        model.clamp_()
        losses.append(loss.item())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, norms


STAGES = (2, 0, 1, 3)


@pytest.fixture(scope="module")
def stage_results(two_node_ray, tmp_path_factory) -> dict:
    """One Ray Train run, 2 workers on 2 nodes, all four stages; stage → rank 0's saved parameters and
    metrics, and "nodes" → the node id of each rank."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    folder = tmp_path_factory.mktemp("engine")
    outs = {stage: str(folder / f"zero{stage}.pt") for stage in STAGES}
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={"stages": outs, "nodes": str(folder / "node")},
        # One rank per node: the collectives cross nodes. 0.5 CPU each leaves room for Ray's own tasks.
        scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=False, resources_per_worker={"CPU": 0.5},
                                     placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(
            name="engine-stages",
            storage_path=str(folder),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}},
        ),
    )
    trainer.fit()
    nodes = [(folder / f"node.{rank}").read_text() for rank in range(WORLD)]
    return {"nodes": nodes, **{stage: torch.load(out) for stage, out in outs.items()}}


@pytest.mark.slow
def test_the_two_ranks_ran_on_the_two_worker_nodes(stage_results, two_node_ray):
    assert sorted(stage_results["nodes"]) == sorted(node.node_id for node in two_node_ray.workers)
    assert two_node_ray.cluster.head_node.node_id not in stage_results["nodes"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", STAGES)
def test_two_ray_workers_match_single_process_full_batch(stage, stage_results):
    cfg = _config(stage)
    got = stage_results[stage]
    want, losses, norms = _reference(cfg)

    assert [m["train/loss"] for m in got["metrics"]] == pytest.approx(losses, rel=1e-5)
    # AdamW is almost invariant to a gradient scale and clipping rescales anyway, so parameters alone
    # would not catch a gradient that is off by a constant factor (e.g. DeepSpeed dividing by the
    # accumulation steps): the pre-clip global norm does.
    assert [m["train/grad_norm"] for m in got["metrics"]] == pytest.approx(norms, rel=1e-5)
    assert norms[0] > cfg.optim.grad_clip  # clipping is active
    assert got["metrics"][0]["train/logit_scale"] == pytest.approx(MAX_LOGIT_SCALE + 0.3)
    assert got["metrics"][1]["train/logit_scale"] <= MAX_LOGIT_SCALE + 1e-7  # clamped after step 1
    assert [m["train/lr"] for m in got["metrics"]] == pytest.approx([1e-3, 0.5e-3])
    worst = {}
    for name, ref in want.items():
        worst[name] = (got["module"][name].view_as(ref) - ref).abs().max().item()
        if got["master"][name] is not None:  # ZeRO keeps an fp32 master copy: it must agree too
            worst[f"{name} (master)"] = (got["master"][name].view_as(ref) - ref).abs().max().item()
    name, diff = max(worst.items(), key=lambda kv: kv[1])
    print(f"ZeRO-{stage}: max |p_ds - p_ref| = {diff:.3g} ({name})")
    assert diff <= TOLERANCE, f"ZeRO-{stage}: {name} differs by {diff:.3g}"
    assert math.isfinite(diff)
