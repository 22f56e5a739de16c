"""`model.image` through the real DeepSpeed engine: a pretrained start, LiT's lock, unlock and lr_mult.

2 processes (torch.distributed, gloo; DeepSpeed reuses the group), every ZeRO stage in turn, fp32, no
dropout (ranks would draw different noise); per rank 2 image micro-batches and 1 text micro-batch, so
a locked step makes 1 backward call where DeepSpeed's accumulation steps say 2
(`BatchGeometry.calls_for`).
The image tower starts from a safetensors file written from a timm model's state dict (`init`), which
every rank loads before the engine is built. The claims, per stage:

- Locked for the run: the tower's parameters are bit-identical to the file's after every step, on both
  ranks; the text tower and temperature equal a plain single-process full-batch step on image
  embeddings of the frozen tower (max |Δp| <= TOLERANCE = 5e-6: see there).
- Unlocked at step 1 with lr_mult 0.5: bit-identical through the locked step, then every parameter
  equals a plain reference in which the tower *joins* the optimizer at step 1 (a second AdamW created
  then, lr × 0.5, one global clip over both), so no stale Adam state or step count survives the lock.
- Resume across the unlock: saved after the locked step, loaded into a fresh engine, 2 more steps:
  parameters, fp32 masters and optimizer state bit-identical to the uninterrupted run.
- The run's checkpoint is itself an `init`: its run directory gives the tower's weights back.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalelab.config import ExperimentConfig, validate

from .compare import differences

WORLD = 2
GLOBAL_BATCH = 16  # 8 rows per rank: image micro-batches of 4 (2 calls), text of 8 (1 call)
STEPS = 3
UNLOCK = 1
STAGES = (0, 1, 2, 3)
# fp32 reduction-order noise in a gradient is ~1e-8, but Adam divides by sqrt(v) + eps, so on an element
# whose gradient is near zero that noise becomes update noise up to ~1e-6 (1.37e-6 on an AMD EPYC host,
# below 1e-6 on others). A wrong gradient, accumulation boundary or optimizer group moves parameters by
# the order of lr * lr_mult = 5e-4.
TOLERANCE = 5e-6
TIMM = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # the micro preset's trunk


def _config(stage: int, image: dict, init: str, name: str = "lock") -> ExperimentConfig:
    return validate(ExperimentConfig, {
        "name": name,
        "model": {"preset": "micro", "image": {"init": init, **image}},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 0, "grad_clip": 0.5},
        "train": {"global_batch": GLOBAL_BATCH, "micro_batch_size": 4, "text_micro_batch_size": 8,
                  "steps": STEPS, "seed": 3, "precision": "fp32", "zero_stage": stage, "num_workers": WORLD},
    })


CASES = {"locked": {"lock": True}, "unlock": {"lock": True, "unlock_at_step": UNLOCK, "lr_mult": 0.5}}


def _write_timm_trunk(path) -> dict[str, torch.Tensor]:
    """A timm ViT with a 10-class head, as someone would have saved it; the file `init` points to."""
    import safetensors.torch
    import timm

    torch.manual_seed(123)
    trunk = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, **TIMM)
    state = {k: v.contiguous() for k, v in trunk.state_dict().items()}
    safetensors.torch.save_file(state, str(path))
    return state


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(1, 4096, (GLOBAL_BATCH, 32), generator=g)
        tokens[:, 16:] = 0
        out.append((torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), tokens))
    return out


# --------------------------------------------------------------------------- without an engine
def _export_dir(tmp_path, model):
    """The files `scalelab export` writes (only model.pt's content matters here)."""
    out = tmp_path / "export"
    out.mkdir()
    torch.save(model.state_dict(), out / "model.pt")
    (out / "config.json").write_text("{}")
    (out / "tokenizer.json").write_text("{}")
    return out


def test_an_export_directory_is_an_init(tmp_path):
    from scalelab.models import create_model
    from scalelab.train.image_tower import prepare_model

    torch.manual_seed(9)
    source = create_model("micro")
    torch.manual_seed(0)
    model = prepare_model(create_model("micro"), _config(0, {}, str(_export_dir(tmp_path, source))))
    torch.manual_seed(0)
    fresh = create_model("micro")
    want = source.image_tower.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.image_tower.state_dict().items())
    text = fresh.text_tower.state_dict()
    assert all(torch.equal(v, text[k]) for k, v in model.text_tower.state_dict().items())


def test_a_bad_init_is_refused_naming_the_field_and_the_keys(tmp_path):
    from scalelab.config import ConfigError
    from scalelab.models import create_model
    from scalelab.train.image_tower import prepare_model, read_image_init

    missing = f"model.image.init: no such file or directory: {tmp_path}/nope"
    with pytest.raises(ConfigError, match=re.escape(missing)):
        read_image_init(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty is neither a `scalelab export` directory nor a checkpoint"):
        read_image_init(str(tmp_path / "empty"))
    state = _write_timm_trunk(tmp_path / "trunk.safetensors")
    state["pos_embed"] = torch.zeros(1, 5, 32)  # another grid
    import safetensors.torch

    safetensors.torch.save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"model.image.init: timm trunk weights do not fit the image tower "
                                          r".*1 key\(s\) with another shape: pos_embed \(file \(1, 5, 32\)"):
        prepare_model(create_model("micro"), _config(0, {}, str(tmp_path / "other.safetensors")))


@pytest.mark.parametrize(("image", "frozen", "groups"), [
    ({}, False, ["decay", "no_decay"]),
    ({"lock": True}, True, ["decay", "no_decay"]),
    ({"lock": True, "unlock_at_step": 5, "lr_mult": 0.5}, False,
     ["decay", "no_decay", "image_tower.decay", "image_tower.no_decay"]),
    ({"lr_mult": 2.0}, False, ["decay", "no_decay", "image_tower.decay", "image_tower.no_decay"]),
])
def test_the_tower_is_laid_out_for_its_setting(image, frozen, groups):
    from scalelab.models import create_model
    from scalelab.train.image_tower import IMAGE_GROUPS, prepare_model
    from scalelab.train.optim import param_groups

    model = prepare_model(create_model("micro"), _config(0, image, None))
    assert all(p.requires_grad is not frozen for p in model.image_tower.parameters())
    assert model.image_tower.training is not image.get("lock", False)
    found = param_groups(model, 0.1)
    assert [g["name"] for g in found] == groups
    assert len(groups) == 2 or tuple(groups[2:]) == IMAGE_GROUPS
    image_ids = {id(p) for p in model.image_tower.parameters()}
    in_shared = {id(p) for g in found[:2] for p in g["params"]}
    assert bool(image_ids & in_shared) is (len(groups) == 2 and not frozen)


def test_paused_groups_keep_a_fresh_optimizer_state():
    from types import SimpleNamespace

    from scalelab.models import create_model
    from scalelab.train.image_tower import IMAGE_GROUPS, enter_image_phase, fresh_while_paused, prepare_model
    from scalelab.train.optim import build_optimizer
    from scalelab.train.schedule import apply_lr

    cfg = _config(0, CASES["unlock"], None)
    model = prepare_model(create_model("micro"), cfg)
    optimizer = build_optimizer(model, cfg.optim)
    phase = enter_image_phase(model, cfg.model.image, step=0)
    assert phase.locked and phase.paused == IMAGE_GROUPS and not model.image_tower.training
    image = {n: p.detach().clone() for n, p in model.image_tower.named_parameters()}
    for _ in range(2):
        for name, p in model.named_parameters():  # what ZeRO hands a paused group: a zero gradient
            p.grad = torch.zeros_like(p) if name.startswith("image_tower.") else torch.ones_like(p)
        apply_lr(optimizer, 1e-3, paused=phase.paused)
        with fresh_while_paused(SimpleNamespace(optimizer=optimizer), phase.paused):
            optimizer.step()
    assert all(torch.equal(p, image[n]) for n, p in model.image_tower.named_parameters())
    tower = {id(p) for p in model.image_tower.parameters()}
    for param, state in optimizer.state.items():
        if id(param) in tower:
            assert all(not v.any() for v in state.values())  # step 0, zero moments: a fresh state
        else:
            assert state["step"].item() == 2 and state["exp_avg"].any()
    phase = enter_image_phase(model, cfg.model.image, step=UNLOCK)
    assert not phase.locked and phase.paused == () and model.image_tower.training
    optimizer.step()  # outside the context the hook is gone
    assert all(optimizer.state[p]["step"].item() == 1 for p in model.image_tower.parameters())


# --------------------------------------------------------------------------- the 2 ranks
def _worker(rank: int, init: str, out: str) -> None:
    import os

    os.environ["LOCAL_RANK"] = str(rank)  # what a launcher sets; DeepSpeed insists on it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=WORLD)
    try:
        record = {}
        for stage in STAGES:
            for case, image in CASES.items():
                record[(stage, case)] = _train(_config(stage, image, init, case), rank, range(STEPS),
                                               directory=f"{out}/{case}{stage}" if case == "locked" else None)
            record[(stage, "resumed")] = _resumed(_config(stage, CASES["unlock"], init, f"zero{stage}"),
                                                  rank, f"{out}/zero{stage}")
        torch.save(record, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _engine(cfg: ExperimentConfig):
    from scalelab.models import create_model
    from scalelab.train.engine import build_engine
    from scalelab.train.image_tower import prepare_model

    torch.manual_seed(cfg.train.seed)  # as ContrastiveTask: the same initial parameters everywhere
    model = prepare_model(create_model(cfg.model.preset), cfg)
    return build_engine(model, cfg, world_size=WORLD)[0]


def _train(cfg: ExperimentConfig, rank: int, steps, engine=None, directory: str | None = None) -> dict:
    from scalelab.train.step import train_step

    engine = engine or _engine(cfg)
    rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    record: dict = {"metrics": [], "image": []}
    batches = _batches()
    for step in steps:
        images, tokens = batches[step]
        record["metrics"].append(train_step(engine, images[rows], tokens[rows], cfg, step=step))
        record["image"].append(_gathered(engine, "image_tower."))
    if directory is not None:
        from scalelab.train.checkpoint import RankState, RunState, save_checkpoint

        run = RunState(step=steps[-1] + 1, world_size=WORLD, config=cfg.to_dict())
        save_checkpoint(engine, f"{directory}/step_{run.step:08d}", run, RankState(), rank)
    record["final"] = _snapshot(engine)
    return record


def _resumed(cfg: ExperimentConfig, rank: int, directory: str) -> dict:
    """Steps 0..UNLOCK-1, a checkpoint, a fresh engine loading it, the steps after."""
    from scalelab.train.checkpoint import load_checkpoint

    _train(cfg, rank, range(UNLOCK), directory=directory)
    engine = _engine(cfg)
    load_checkpoint(engine, f"{directory}/step_{UNLOCK:08d}", rank, WORLD)
    return _train(cfg, rank, range(UNLOCK, STEPS), engine=engine)


def _gathered(engine, prefix: str = "") -> dict[str, torch.Tensor]:
    """The module's parameters under `prefix`, whole (gathered under ZeRO-3: collective)."""
    import deepspeed

    from scalelab.train.engine import zero_stage

    params = [(n, p) for n, p in engine.module.named_parameters() if n.startswith(prefix)]
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero_stage(engine) == 3):
        return {n: p.detach().clone() for n, p in params}


def _snapshot(engine) -> dict:
    """Module parameters (gathered), fp32 masters (None where there are none) and raw optimizer state."""
    import deepspeed

    params = list(engine.module.named_parameters())
    masters = {n: deepspeed.utils.safe_get_full_fp32_param(p) for n, p in params}  # collective
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = {i: copy.deepcopy(s) for i, s in enumerate(torch_optimizer.state.values())}
    return {"module": _gathered(engine), "master": copy.deepcopy(masters), "optimizer": state}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both ranks' records, the file the towers started from, and the run directories."""
    folder = tmp_path_factory.mktemp("image_tower")
    trunk = _write_timm_trunk(folder / "trunk.safetensors")
    mp.start_processes(_worker, args=(str(folder / "trunk.safetensors"), str(folder)), nprocs=WORLD,
                       start_method="spawn", join=True)
    records = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"records": records, "trunk": trunk, "folder": folder}


# --------------------------------------------------------------------------- the plain reference
def _reference(image: dict, trunk: dict[str, torch.Tensor]) -> dict:
    """One process, plain torch: the full-batch loss, one backward, one clip over every trained
    parameter, AdamW; the image tower frozen and in eval mode until it unlocks, then a second AdamW
    over its parameters created at that step (lr × lr_mult)."""
    from scalelab.losses import contrastive_loss
    from scalelab.models import create_model
    from scalelab.train.optim import param_groups
    from scalelab.train.schedule import lr_for

    cfg = _config(0, image, "unused")
    torch.manual_seed(cfg.train.seed)
    model = create_model("micro")
    model.image_tower.backbone.load_state_dict({k: v for k, v in trunk.items() if not k.startswith("head.")})
    model.image_tower.requires_grad_(False)
    model.image_tower.eval()
    text = torch.optim.AdamW(param_groups(model, 0.1), betas=(0.9, 0.98), eps=1e-6)
    tower, losses, norms = None, [], []
    for step, (images, tokens) in enumerate(_batches()):
        unlocked = image.get("unlock_at_step") is not None and step >= image["unlock_at_step"]
        if unlocked and tower is None:  # the tower joins the optimizer now
            model.image_tower.requires_grad_(True).train()
            tower = torch.optim.AdamW(param_groups(model.image_tower, 0.1), betas=(0.9, 0.98), eps=1e-6)
        lr = lr_for(step, cfg.optim, STEPS)
        for group in text.param_groups:
            group["lr"] = lr
        for group in tower.param_groups if tower else ():
            group["lr"] = lr * image.get("lr_mult", 1.0)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(unlocked):
            img = model.encode_image(images)
        loss = contrastive_loss(img, model.encode_text(tokens), model.logit_scale.exp())
        loss.backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        norms.append(torch.nn.utils.clip_grad_norm_(trained, cfg.optim.grad_clip).item())
        text.step()
        if tower:
            tower.step()
        model.clamp_()
        losses.append(loss.item())
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses,
            "norms": norms}


def _worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[str, float]:
    diffs = {n: (got[n].view_as(w) - w).abs().max().item() for n, w in want.items()}
    return max(diffs.items(), key=lambda kv: kv[1])


def _start(trunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower's parameters as `init` loads them: the file's trunk, the seeded projection."""
    from scalelab.models import create_model

    torch.manual_seed(3)
    proj = create_model("micro").image_tower.proj.weight.detach()
    start = {f"image_tower.backbone.{k}": v for k, v in trunk.items() if not k.startswith("head.")}
    return {**start, "image_tower.proj.weight": proj}


# --------------------------------------------------------------------------- the claims
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", STAGES)
def test_a_locked_tower_stays_bit_identical_and_the_text_tower_trains_exactly(stage, run):
    start = _start(run["trunk"])
    for rank, record in enumerate(run["records"]):
        got = record[(stage, "locked")]
        for step, image in enumerate(got["image"]):
            changed = [n for n, v in start.items() if not torch.equal(image[n].view_as(v), v)]
            assert not changed, f"ZeRO-{stage} rank {rank} step {step}: {changed}"
        assert all(got["final"]["master"][n] is None for n in start)  # frozen: in no optimizer group
        assert [m["train/image_locked"] for m in got["metrics"]] == [1.0] * STEPS
    got = run["records"][0][(stage, "locked")]
    want = _reference(CASES["locked"], run["trunk"])
    assert [m["train/loss"] for m in got["metrics"]] == pytest.approx(want["losses"], rel=1e-5)
    assert [m["train/grad_norm"] for m in got["metrics"]] == pytest.approx(want["norms"], rel=1e-5)
    name, diff = _worst(got["final"]["module"], want["params"])
    assert diff <= TOLERANCE, f"ZeRO-{stage}: {name} differs by {diff:.3g}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", STAGES)
def test_unlocking_equals_the_tower_joining_the_optimizer_at_that_step(stage, run):
    start = _start(run["trunk"])
    got = run["records"][0][(stage, "unlock")]
    for step in range(UNLOCK):
        assert all(torch.equal(got["image"][step][n].view_as(v), v) for n, v in start.items()), step
    moved = [n for n, v in start.items() if not torch.equal(got["image"][UNLOCK][n].view_as(v), v)]
    assert len(moved) == len(start)  # the first unlocked step trains every tensor of the tower
    assert [m["train/image_locked"] for m in got["metrics"]] == [1.0] * UNLOCK + [0.0] * (STEPS - UNLOCK)
    want = _reference(CASES["unlock"], run["trunk"])
    assert [m["train/loss"] for m in got["metrics"]] == pytest.approx(want["losses"], rel=1e-5)
    assert [m["train/grad_norm"] for m in got["metrics"]] == pytest.approx(want["norms"], rel=1e-5)
    name, diff = _worst(got["final"]["module"], want["params"])
    assert diff <= TOLERANCE, f"ZeRO-{stage}: {name} differs by {diff:.3g}"
    if stage:  # ZeRO-1/2/3: the fp32 masters too
        masters = {n: m for n, m in got["final"]["master"].items() if m is not None}
        assert set(masters) == set(want["params"])
        name, diff = _worst(masters, want["params"])
        assert diff <= TOLERANCE, f"ZeRO-{stage} master: {name} differs by {diff:.3g}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", STAGES)
def test_a_run_resumed_across_the_unlock_equals_the_uninterrupted_one(stage, run):
    for rank, record in enumerate(run["records"]):
        resumed, straight = record[(stage, "resumed")], record[(stage, "unlock")]
        assert [m["train/loss"] for m in resumed["metrics"]] == \
            [m["train/loss"] for m in straight["metrics"][UNLOCK:]]
        assert not differences(resumed["final"], straight["final"]), f"ZeRO-{stage} rank {rank}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("run_name", ["locked", "zero"])  # frozen parameters / the tower in the optimizer
def test_a_run_directory_is_an_init(stage, run_name, run):
    from scalelab.models import create_model, load_image_weights
    from scalelab.train.image_tower import read_image_init

    start = _start(run["trunk"])  # both checkpoints were written while the tower was locked
    state = read_image_init(str(run["folder"] / f"{run_name}{stage}"))
    assert {n: state[n] for n in start}.keys() == start.keys()
    assert all(torch.equal(state[n], v) for n, v in start.items())
    tower = create_model("micro").image_tower
    assert load_image_weights(tower, state) is tower  # the whole tower, projection included
    assert torch.equal(tower.proj.weight, start["image_tower.proj.weight"])
