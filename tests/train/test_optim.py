"""Weight-decay groups (expectations derived independently, by module type) and the optimizer factory.

Every optimizer (`optim.name`) gets the same groups and decays only the decay group, by lr_t · wd. Lion and
adafactor_bv are timm's, built with the arguments the module docstring states: checked against timm's
classes constructed directly (float64, two steps), and adafactor_bv's factored rule against a naive one.
Lion under DeepSpeed ZeRO 0-3, and adafactor_bv at ZeRO-0, equal a plain single-process torch run (real
engines, in a subprocess), which also shows what DeepSpeed hands the optimizer at each stage: flat 1-D
partitions at ZeRO-1/2/3, the premise of adafactor_bv's refusal there (test_ds_config.py, test_preflight.py).
"""

import copy
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from scalelab.config import MAX_LOGIT_SCALE, ExperimentConfig, OptimConfig, validate
from scalelab.models import create_model, get_spec
from scalelab.models.presets import build_model
from scalelab.train.optim import OPTIMIZERS, build_optimizer, param_groups
from scalelab.train.schedule import apply_lr

from .test_engine import GLOBAL_BATCH, STEPS, _model_and_batches, _reference

NORMS = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
MATRICES = (nn.Linear, nn.Conv2d, nn.Embedding)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("micro")


def _names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _expected(model):
    """(decay, no_decay) names from module types, not from the rule under test."""
    decay, no_decay = set(), set()
    for mname, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            name = f"{mname}.{attr}"
            if isinstance(module, NORMS) or attr == "bias" or mname == "temperature":
                no_decay.add(name)
            elif isinstance(module, MATRICES) and attr == "weight":
                decay.add(name)
    # the learned position tables (and ViT's class token, which timm exempts beside pos_embed)
    no_decay |= {"text_tower.positional_embedding", "image_tower.backbone.pos_embed",
                 "image_tower.backbone.cls_token"}
    return decay, no_decay


def test_every_parameter_in_exactly_one_group(micro):
    groups = param_groups(micro, 0.1)
    listed = [n for g in groups for n in _names(micro, g["params"])]
    assert len(listed) == len(set(listed))
    assert set(listed) == {n for n, p in micro.named_parameters() if p.requires_grad}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_no_decay_set_is_biases_norms_temperature_positions(micro):
    decay, no_decay = _expected(micro)
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, _ in micro.named_parameters()}  # the expectation covers all
    groups = {g["name"]: set(_names(micro, g["params"])) for g in param_groups(micro, 0.1)}
    assert groups["no_decay"] == no_decay
    assert groups["decay"] == decay
    assert "text_tower.token_embedding.weight" in groups["decay"]


def test_logit_bias_and_batchnorm_groupnorm_are_exempt():
    model = build_model(get_spec("micro", logit_bias=True))
    model.extra = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8))
    no_decay = set(_names(model, param_groups(model, 0.1)[1]["params"]))
    assert {"temperature.logit_bias", "temperature.logit_scale", "extra.0.bias", "extra.1.weight",
            "extra.1.bias", "extra.2.weight", "extra.2.bias"} <= no_decay
    assert "extra.0.weight" not in no_decay


def test_frozen_parameters_are_left_out_and_zero_decay_keeps_both_groups(micro):
    model = create_model("micro")
    model.text_tower.proj.weight.requires_grad_(False)
    groups = param_groups(model, 0.0)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert "text_tower.proj.weight" not in _names(model, [p for g in groups for p in g["params"]])


def test_adamw_decays_only_the_decay_group():
    model = create_model("micro")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.1, 0.5
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=lr, weight_decay=wd))
    assert isinstance(opt, torch.optim.AdamW)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0/(0+eps) = 0: only the decay acts
    opt.step()
    decay, _ = _expected(model)
    for n, p in model.named_parameters():
        want = before[n] * (1 - lr * wd) if n in decay else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=n)
    assert not torch.equal(model.text_tower.proj.weight, before["text_tower.proj.weight"])


def test_adafactor_builds_and_steps():
    torch.manual_seed(0)
    model = create_model("micro")
    opt = build_optimizer(model, OptimConfig(name="adafactor", lr=1e-2, weight_decay=0.1))
    assert isinstance(opt, torch.optim.Adafactor)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    img = torch.randn(2, 3, 32, 32)
    tok = torch.randint(1, 100, (2, 8))
    i, t = model(img, tok)
    (model.logit_scale.exp() * (i @ t.T)).diagonal().sum().neg().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# --------------------------------------------------------------------------- every optimizer
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_gets_the_groups_and_decays_only_the_decay_group_by_lr_times_wd(name):
    """Zero gradients leave each optimizer's own update at 0 (Adam 0/(0+eps), Lion sign(0), the Adafactors
    0/sqrt(eps)), so only the decoupled decay acts: θ(1 − lr_t·wd) on the decay group, nothing elsewhere.
    lr_t is set after construction as the training loop sets it: the decay follows the current lr."""
    model = create_model("micro")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.02, 0.5
    opt = build_optimizer(model, OptimConfig(name=name, lr=1.0, weight_decay=wd))
    decay, no_decay = _expected(model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(_names(model, groups["decay"]["params"])) == decay
    assert set(_names(model, groups["no_decay"]["params"])) == no_decay
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (wd, 0.0)
    apply_lr(opt, lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in decay:
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr * wd), rtol=1e-6, atol=0, msg=n)
        else:
            assert torch.equal(p.detach(), before[n]), n


def test_lion_and_adafactor_bv_take_their_arguments_from_the_config():
    from timm.optim import AdafactorBigVision, Lion

    model = create_model("micro")
    lion = build_optimizer(model, OptimConfig(name="lion", lr=3e-4, betas=(0.95, 0.98), weight_decay=1.0))
    assert isinstance(lion, Lion)
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in lion.param_groups] == [
        (3e-4, (0.95, 0.98), 1.0), (3e-4, (0.95, 0.98), 0.0)]
    assert not any(g["caution"] or g["corrected_weight_decay"] for g in lion.param_groups)
    bv = build_optimizer(model, OptimConfig(name="adafactor_bv", lr=1e-3, betas=(0.8, 0.5), eps=1e-3))
    assert isinstance(bv, AdafactorBigVision)
    group = bv.param_groups[0]
    # big_vision's scale_by_adafactor defaults; betas[0] is the momentum, betas[1] and eps do not apply
    keys = ("lr", "momentum", "momentum_dtype", "min_dim_size_to_factor", "decay_rate", "decay_offset",
            "beta2_cap", "eps", "clipping_threshold", "unscaled_wd")
    assert {k: group[k] for k in keys} == {
        "lr": 1e-3, "momentum": 0.8, "momentum_dtype": torch.bfloat16, "min_dim_size_to_factor": 32,
        "decay_rate": 0.8, "decay_offset": 0, "beta2_cap": 0.999, "eps": 1e-30, "clipping_threshold": None,
        "unscaled_wd": False}


@pytest.mark.parametrize(("name", "betas", "message"), [
    ("lion", (0.9, 1.0), "Invalid beta parameter at index 1"),
    ("lion", (-0.1, 0.99), "Invalid beta parameter at index 0"),
    ("adafactor_bv", (1.0, 0.99), "adafactor_bv's momentum"),
])
def test_bad_betas_are_refused(name, betas, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(create_model("micro"), OptimConfig(name=name, betas=betas))


def _timm_direct(name: str, model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """timm's class built by hand on groups named by module type (`_expected`), timm's own defaults
    for every argument the docstring says is big_vision's default or left off."""
    from timm.optim import AdafactorBigVision, Lion

    decay, no_decay = _expected(model)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in sorted(decay)], "weight_decay": cfg.weight_decay},
              {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0}]
    if name == "lion":
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    return AdafactorBigVision(groups, lr=cfg.lr, momentum=cfg.betas[0], min_dim_size_to_factor=32)


@pytest.mark.parametrize("name", ["lion", "adafactor_bv"])
def test_build_optimizer_equals_timm_constructed_directly(name):
    """float64, ZeRO-0-like (the parameters themselves), two steps with a scheduled lr: bit-identical."""
    cfg = OptimConfig(name=name, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.3)
    torch.manual_seed(0)
    ours = create_model("micro").double()
    theirs = copy.deepcopy(ours)
    optimizers = build_optimizer(ours, cfg), _timm_direct(name, theirs, cfg)
    g = torch.Generator().manual_seed(1)
    for lr in (cfg.lr, cfg.lr / 3):
        images = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64)
        tokens = torch.randint(1, 100, (6, 8), generator=g)
        for model, opt in zip((ours, theirs), optimizers):
            apply_lr(opt, lr)
            opt.zero_grad(set_to_none=True)
            i, t = model(images, tokens)
            (model.logit_scale.exp() * (i @ t.T)).log_softmax(-1).diagonal().sum().neg().backward()
            opt.step()
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), n
    torch.manual_seed(0)
    start = create_model("micro").double()  # the same seed, the same start: the steps did move it
    moved = {n for (n, a), b in zip(ours.named_parameters(), start.parameters()) if not torch.equal(a, b)}
    assert {"text_tower.proj.weight", "image_tower.proj.weight", "temperature.logit_scale"} <= moved


def _naive_bv_update(grad: torch.Tensor, min_dim: int = 32, eps: float = 1e-30) -> torch.Tensor:
    """big_vision's first step, float64, no momentum: β₂_1 = min(0.999, 1 − 1^−0.8) = 0, so the second
    moment is this step's g² + eps; a matrix whose two dims are ≥ min_dim keeps only its row and column
    means, v ≈ r cᵀ / mean(r)."""
    g2 = grad.double() ** 2 + eps
    if grad.ndim == 2 and min(grad.shape) >= min_dim:
        rows, cols = g2.mean(dim=1, keepdim=True), g2.mean(dim=0, keepdim=True)
        return grad.double() / torch.sqrt(rows * cols / rows.mean())
    return grad.double() / torch.sqrt(g2)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (16, 40), (40,)])
def test_adafactor_bv_first_step_matches_the_naive_factored_rule(shape):
    """Tall and wide matrices alike (timm < 1.0.29 dropped the row factor of tall ones), a matrix too
    narrow to factor, and a vector. The momentum is stored in bf16: step 1 moves θ by −lr·m with
    m = bf16 lerp(0, bf16(u), 1 − β), three bf16 roundings (u, the weight 0.1, the result: ≤ 3·2^−9,
    6.0e-3 measured), hence rtol 2^−7; the orientation bug was off by O(1)."""
    torch.manual_seed(0)
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    grad = torch.randn(shape, dtype=torch.float64) * torch.linspace(0.1, 3, shape[-1], dtype=torch.float64)
    before = layer.weight.detach().clone()
    lr, beta = 0.1, 0.9
    opt = build_optimizer(layer, OptimConfig(name="adafactor_bv", lr=lr, betas=(beta, 0.99), weight_decay=0))
    layer.weight.grad = grad.clone()
    opt.step()
    factored = "exp_avg_sq_r" in opt.state[layer.weight]
    assert factored == (len(shape) == 2 and min(shape) >= 32)
    want = -lr * (1 - beta) * _naive_bv_update(grad)
    torch.testing.assert_close(layer.weight.detach() - before, want, rtol=2**-7, atol=1e-12)


# --------------------------------------------------------------------------- under DeepSpeed ZeRO
# One process, world size 1, no Ray: a real engine per run (each from the same start), `train_step`
# (the gradient cache and DeepSpeed's clipping) over the batches of test_engine.py. In a subprocess so
# DeepSpeed's process group and global state stay out of this test process. World size 1 still
# flattens: ZeRO-1/2/3 hand the optimizer one flat fp32 partition per group (ZeRO-3: sub-groups). Each
# run also records what the wrapped torch optimizer stepped: the tensors' shapes and dtypes and whether
# their state is factored.
_ZERO_RUNS = """
import os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, torch
from scalelab.config import ExperimentConfig, validate
from scalelab.models import create_model
from scalelab.train.engine import build_engine, zero_stage
from scalelab.train.step import train_step
torch.set_num_threads(1)
job = torch.load(sys.argv[1])
for run in job["runs"]:
    cfg = validate(ExperimentConfig, run["config"])
    model = create_model(cfg.model.preset, **cfg.model.overrides).train()
    model.load_state_dict(job["start"])
    engine, _ = build_engine(model, cfg, world_size=1)
    assert zero_stage(engine) == cfg.train.zero_stage
    # float32 images as the data pipeline gives them, also to a bf16 module (train_step casts them)
    metrics = [train_step(engine, images, tokens, cfg, step=s)
               for s, (images, tokens) in enumerate(job["batches"])]
    params = list(engine.module.named_parameters())
    master = {n: deepspeed.utils.safe_get_full_fp32_param(p) for n, p in params}  # None at ZeRO-0 fp32
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero_stage(engine) == 3):
        module = {n: p.detach().float().clone() for n, p in params}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside a wrapper
    # its state's keys are the tensors it stepped (ZeRO-3 empties param_groups again after its step)
    handed = [(tuple(p.shape), p.dtype, "exp_avg_sq_r" in state) for p, state in inner.state.items()]
    torch.save({"module": module, "master": master, "metrics": metrics, "handed": handed}, run["out"])
"""

ZERO_RUNS = [("lion", 0, "fp32"), ("lion", 1, "fp32"), ("lion", 2, "fp32"), ("lion", 3, "fp32"),
             ("adafactor_bv", 0, "fp32"), ("adafactor_bv", 0, "bf16")]
ZERO_IDS = [f"{n}-zero{s}-{p}" for n, s, p in ZERO_RUNS]
# Lion: fp32 rounding (measured: 0, bit for bit). adafactor_bv keeps its momentum in bf16: a gradient
# that differs by rounding can move m across a bf16 rounding boundary, lr·2^-8·|m| per step (measured
# 1e-6); an unfactored or otherwise wrong update differs by ~lr·(1 − β) = 1e-4.
ZERO_TOLERANCE = {"lion": 1e-6, "adafactor_bv": 1e-5}


def _zero_config(name: str, stage: int, precision: str) -> ExperimentConfig:
    optim = {"lion": {"name": "lion", "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.5},
             "adafactor_bv": {"name": "adafactor_bv", "lr": 1e-3, "weight_decay": 0.1}}[name]
    return validate(ExperimentConfig, {
        "name": f"{name}-zero{stage}-{precision}",
        "model": {"preset": "micro", "overrides": {"init_logit_scale": MAX_LOGIT_SCALE + 0.3}},
        "optim": {**optim, "warmup_steps": 0, "grad_clip": 0.5},
        "train": {"global_batch": GLOBAL_BATCH, "micro_batch_size": 5, "text_micro_batch_size": 7,
                  "steps": STEPS, "seed": 3, "precision": precision, "zero_stage": stage, "num_workers": 1},
    })


def _determined(name: str, param: torch.Tensor) -> torch.Tensor:
    """Mask of the coordinates whose gradient is not identically zero: all but the key third of a fused
    [q | k | v] attention bias (timm's ViT and our TextTower both lay qkv.bias out so)."""
    keep = torch.ones_like(param, dtype=torch.bool)
    if name.endswith("attn.qkv.bias"):
        third = param.numel() // 3
        keep[third : 2 * third] = False
    return keep


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> dict[tuple[str, int, str], dict]:
    folder = tmp_path_factory.mktemp("zero")
    model, batches = _model_and_batches(_zero_config(*ZERO_RUNS[0]))  # one start and data for every run
    outs = {run: str(folder / f"{'-'.join(map(str, run))}.pt") for run in ZERO_RUNS}
    job = folder / "job.pt"
    runs = [{"config": _zero_config(*run).to_dict(), "out": out} for run, out in outs.items()]
    torch.save({"start": model.state_dict(), "batches": batches, "runs": runs}, job)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-c", _ZERO_RUNS, str(job), str(port)], check=True,
                   cwd=Path(__file__).resolve().parents[2])
    return {run: torch.load(out) for run, out in outs.items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", [r for r in ZERO_RUNS if r[2] == "fp32"],
                         ids=[i for r, i in zip(ZERO_RUNS, ZERO_IDS) if r[2] == "fp32"])
def test_optimizer_under_zero_matches_plain_torch(run, zero_runs):
    """Two steps (the second from DeepSpeed's own state: Lion's momentum, the clamp, clipping) equal the
    single-process reference of test_engine.py (full-batch loss, clip_grad_norm_, build_optimizer, clamp).
    Lion moves every coordinate by ±lr_t: a partition that changed its math shows as differences of
    order lr = 1e-3, rounding as ~1e-9.

    Except the attention *key* biases (the middle third of each `qkv.bias`): softmax is invariant to a
    shift shared by all keys, and q·b_k is one, so their gradient is exactly 0 in exact arithmetic and
    rounding noise (~1e-10) in both runs. Lion takes its sign (±lr), adafactor_bv divides it by its own
    RMS: noise becomes a full step, differently in each run (measured: only these coordinates differ,
    at every stage including ZeRO-0, so it is the gradient cache's rounding, not a partition)."""
    cfg = _zero_config(*run)
    got = zero_runs[run]
    want, losses, norms = _reference(cfg)
    assert [m["train/loss"] for m in got["metrics"]] == pytest.approx(losses, rel=1e-5)
    assert [m["train/grad_norm"] for m in got["metrics"]] == pytest.approx(norms, rel=1e-5)
    assert norms[0] > cfg.optim.grad_clip  # clipping is active
    worst = {}
    for name, ref in want.items():
        keep = _determined(name, ref)
        worst[name] = (got["module"][name].view_as(ref) - ref)[keep].abs().max().item()
        if got["master"][name] is not None:  # ZeRO's fp32 master copy must agree too
            worst[f"{name} (master)"] = (got["master"][name].view_as(ref) - ref)[keep].abs().max().item()
    name, diff = max(worst.items(), key=lambda kv: kv[1])
    print(f"{run}: max |p_ds - p_ref| = {diff:.3g} ({name})")
    assert math.isfinite(diff) and diff <= ZERO_TOLERANCE[run[0]], f"{run}: {name} differs by {diff:.3g}"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", ZERO_RUNS, ids=ZERO_IDS)
def test_what_deepspeed_hands_the_optimizer(run, zero_runs):
    """The premise of the ZeRO-1/2/3 refusal and of ZeRO-0's acceptance: ZeRO-1/2/3 hand the torch
    optimizer flat 1-D fp32 partitions; ZeRO-0 hands it tensors of the parameters' own shapes, in fp32
    (the parameters, or in bf16 DeepSpeed's per-parameter fp32 masters), so adafactor_bv factors every
    matrix whose two largest dims are >= 32 in bf16 as in fp32. The bf16 run trains (finite, moved)."""
    name, stage, _ = run
    got = zero_runs[run]
    handed = got["handed"]
    assert handed and all(dtype == torch.float32 for _, dtype, _ in handed)
    shapes = sorted(shape for shape, _, _ in handed)
    model = create_model("micro")
    own = sorted(tuple(p.shape) if p.ndim else (1,) for p in model.parameters())  # 0-dim -> [1] (engine)
    if stage == 0:
        assert shapes == own
    else:
        assert all(len(shape) == 1 for shape in shapes) and len(shapes) < len(own)
    if name == "adafactor_bv":
        factored = sorted(shape for shape, _, is_factored in handed if is_factored)
        assert factored == sorted(s for s in own if len(s) >= 2 and sorted(s)[-2] >= 32)
        assert len(factored) >= 20  # every 32-wide weight matrix of the micro preset
    assert all(math.isfinite(m["train/loss"]) and not m["train/skipped"] for m in got["metrics"])
    torch.manual_seed(0)
    start = dict(_model_and_batches(_zero_config(*run))[0].named_parameters())
    assert not torch.equal(got["module"]["text_tower.proj.weight"], start["text_tower.proj.weight"].float())
def test_a_module_with_an_lr_mult_gets_groups_of_its_own(micro):
    model = create_model("micro")
    plain = [(g["name"], len(g["params"])) for g in param_groups(model, 0.1)]
    model.image_tower.lr_mult = 0.5
    groups = param_groups(model, 0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "image_tower.decay", "image_tower.no_decay"]
    assert [g.get("lr_mult") for g in groups] == [None, None, 0.5, 0.5]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0]
    by_group = {g["name"]: set(_names(model, g["params"])) for g in groups}
    image = {n for n, _ in model.named_parameters() if n.startswith("image_tower.")}
    assert by_group["image_tower.decay"] | by_group["image_tower.no_decay"] == image
    assert not image & (by_group["decay"] | by_group["no_decay"])
    # the decay rule is unchanged: a parameter decays in the tower's groups iff it did before
    decay, _ = _expected(model)
    assert by_group["decay"] | by_group["image_tower.decay"] == decay
    model.image_tower.lr_mult = None
    assert [(g["name"], len(g["params"])) for g in param_groups(model, 0.1)] == plain
