"""The optimizer's fp32 master copies at every stage, ZeRO-0 bf16 included: clamped, and fresh at start.

At ZeRO-0 with bf16 DeepSpeed 0.19.8 wraps the torch optimizer in `FP16_UnfusedOptimizer`, whose
per-parameter fp32 masters `deepspeed.utils.safe_get_full_fp32_param` cannot see (it returns None). Two
claims, on single-process engines (world size 1, no Ray; in a subprocess as in test_optim.py, so
DeepSpeed's process group stays out of this process) trained with `train_step` on test_engine.py's
model and batches, logit_scale starting at ln 100 + 0.3:

- After every step the temperature is clamped to ≤ ln 100 in the module (bf16: ≤ the bf16 rounding of
  the bound, which is what `clamp_` on a bf16 tensor gives) *and* in the optimizer's fp32 master, read
  here from the wrapper itself (`fp32_groups` aligned with `fp16_groups`, as export reads it), not
  through scalelab's accessor. An unclamped master is copied back into the module at the next step.
- Right after `build_engine` the torch optimizer has taken no step (no state) and every master equals
  its parameter: `FP16_UnfusedOptimizer`'s constructor steps it once with zero gradients, which left
  Adam's step count at 1 (a first update ~0.74 of ZeRO-2's) and weight-decayed the masters once.
  With both fixed, ZeRO-0 bf16 computes the same gradient norms as ZeRO-2 bf16 (measured: rel 3e-7;
  before: 532 against 379 at the second step).
ZeRO-1/2 in bf16 and ZeRO-0 in fp32 (the torch optimizer steps the parameters: no master) are run too,
to show those paths keep working.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalelab.config import MAX_LOGIT_SCALE, ExperimentConfig, validate

from .test_engine import _config, _model_and_batches

RUNS = [(0, "bf16"), (1, "bf16"), (2, "bf16"), (0, "fp32")]
IDS = [f"zero{stage}-{precision}" for stage, precision in RUNS]

_SCRIPT = """
import os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, torch
from scalelab.config import ExperimentConfig, validate
from scalelab.models import create_model
from scalelab.train.engine import build_engine, fp32_master, zero_stage
from scalelab.train.step import train_step
torch.set_num_threads(1)
job = torch.load(sys.argv[1])

def masters(engine):
    '''name -> the optimizer's fp32 master, read without scalelab's accessor; the parameter at ZeRO-0 fp32'''
    opt, params = engine.optimizer, dict(engine.module.named_parameters())
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # FP16_UnfusedOptimizer (ZeRO-0 bf16)
        names = {id(p): n for n, p in params.items()}
        return {names[id(p)]: m.detach().clone() for mg, pg in zip(opt.fp32_groups, opt.fp16_groups)
                for m, p in zip(mg, pg)}
    out = {n: deepspeed.utils.safe_get_full_fp32_param(p) for n, p in params.items()}
    return {n: (params[n].detach().clone() if m is None else m) for n, m in out.items()}

for run in job["runs"]:
    cfg = validate(ExperimentConfig, run["config"])
    model = create_model(cfg.model.preset, **cfg.model.overrides).train()
    model.load_state_dict(job["start"])
    engine, _ = build_engine(model, cfg, world_size=1)
    assert zero_stage(engine) == cfg.train.zero_stage
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    start = {"state": len(inner.state), "masters": masters(engine),
             "module": {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}}
    steps = []
    for s, (images, tokens) in enumerate(job["batches"]):
        metrics = train_step(engine, images, tokens, cfg, step=s)
        param = engine.module.temperature.logit_scale
        steps.append({"metrics": metrics, "module": param.detach().clone(),
                      "master": masters(engine)["temperature.logit_scale"]})
    accessor = {n: fp32_master(engine, p) for n, p in engine.module.named_parameters()}
    torch.save({"start": start, "steps": steps, "end": masters(engine), "accessor": accessor}, run["out"])
"""


def _run_config(stage: int, precision: str) -> ExperimentConfig:
    """test_engine.py's config (init_logit_scale = ln 100 + 0.3, AdamW with weight decay, clipping) on
    one process at `stage` and `precision`."""
    cfg = _config(stage).to_dict()
    cfg["train"].update(precision=precision, num_workers=1)
    cfg["name"] = f"masters-zero{stage}-{precision}"
    return validate(ExperimentConfig, cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[int, str], dict]:
    folder = tmp_path_factory.mktemp("masters")
    model, batches = _model_and_batches(_run_config(*RUNS[0]))
    assert model.temperature.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE + 0.3)
    outs = {run: str(folder / f"{run[0]}-{run[1]}.pt") for run in RUNS}
    job = folder / "job.pt"
    torch.save({"start": model.state_dict(), "batches": batches,
                "runs": [{"config": _run_config(*run).to_dict(), "out": out} for run, out in outs.items()]},
               job)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-c", _SCRIPT, str(job), str(port)], check=True,
                   cwd=Path(__file__).resolve().parents[2])
    return {run: torch.load(out) for run, out in outs.items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_temperature_is_clamped_in_the_module_and_in_the_fp32_master(run, runs):
    got = runs[run]
    assert got["steps"] and all(not step["metrics"]["train/skipped"] for step in got["steps"])
    for i, step in enumerate(got["steps"]):
        module, master = step["module"], step["master"]
        bound = torch.tensor(MAX_LOGIT_SCALE, dtype=module.dtype).item()  # bf16: 4.59375 < ln 100
        assert module.item() <= bound, f"step {i}: module logit_scale {module.item()} > {bound}"
        assert master.dtype == torch.float32
        assert master.item() <= torch.tensor(MAX_LOGIT_SCALE, dtype=torch.float32).item(), (
            f"step {i}: fp32 master logit_scale {master.item()} > ln 100 = {MAX_LOGIT_SCALE}"
        )
        # the loss of the next step used the clamped value
        if i + 1 < len(got["steps"]):
            assert got["steps"][i + 1]["metrics"]["train/logit_scale"] <= MAX_LOGIT_SCALE + 1e-6


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_the_optimizer_starts_fresh_with_masters_equal_to_the_parameters(run, runs):
    start = runs[run]["start"]
    assert start["state"] == 0  # no step taken: Adam's first update is lr·sign(g), as at every stage
    assert sorted(start["masters"]) == sorted(start["module"])
    for name, master in start["masters"].items():
        assert torch.equal(master.float().reshape(-1), start["module"][name].reshape(-1)), name


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_fp32_master_reads_the_masters_at_every_stage(run, runs):
    """`engine.fp32_master` (what the clamp and `ContrastiveTask.full_weights` read): the masters read
    from the optimizer itself, ZeRO-0 bf16 included; None at ZeRO-0 fp32 (the parameters are stepped)."""
    got = runs[run]
    for name, want in got["end"].items():
        master = got["accessor"][name]
        if run == (0, "fp32"):
            assert master is None, name
        else:
            assert master is not None and torch.equal(master, want), name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero0_bf16_computes_what_zero2_bf16_computes(runs):
    """Same bf16 module, same masters, same optimizer state: the same gradient norms at every step up to
    reduction order (a one-step-ahead Adam gives 40% apart at the second step)."""
    zero0, zero2 = (runs[(stage, "bf16")]["steps"] for stage in (0, 2))
    norms0 = [step["metrics"]["train/grad_norm"] for step in zero0]
    norms2 = [step["metrics"]["train/grad_norm"] for step in zero2]
    assert norms0 == pytest.approx(norms2, rel=1e-4)
