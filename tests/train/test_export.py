"""`scalelab export` / `scalelab eval --checkpoint`: real runs (local Ray, DeepSpeed ZeRO on CPU) exported
and re-evaluated must reproduce the end-of-training metrics exactly, for ZeRO-0, -2 and -3. The ZeRO-2
run is the session's smoke run (2 workers, every eval set and retrieval), shared with test_launch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from scalelab.cli import main
from scalelab.config import deep_merge
from scalelab.eval import load_exported
from scalelab.models import create_model
from scalelab.train.checkpoint import DS_SUBDIR, DS_TAG, latest_checkpoint, read_run_state
from scalelab.train.export import export_checkpoint, is_exported

REPO = Path(__file__).resolve().parents[2]

# Fewer steps than the smoke run: enough for the weights to move far from the initialisation.
_SHORT = {"train": {"steps": 6}, "eval": {"every_steps": None}, "run": {"checkpoint_every": 3}}
_RUNS = {
    "zero2": None,  # the smoke run: 2 workers, ZeRO-2, fp32, 30 steps
    # One worker each (a 2-worker launch costs more start-up on 2 CPUs); the zero2 run already
    # stitches partitions from 2 ranks.
    "zero3": {"train": {"zero_stage": 3, "num_workers": 1}},
    "zero0": {"train": {"zero_stage": 0, "num_workers": 1}},
}


@pytest.fixture(scope="module")
def trained(smoke_config, smoke_run, local_ray, tmp_path_factory) -> dict[str, Any]:
    """One run per ZeRO stage; name → (TrainResult, its latest checkpoint, an export of it)."""
    from scalelab.train.launch import launch

    storage = tmp_path_factory.mktemp("export_runs")
    out = {}
    for name, overrides in _RUNS.items():
        if overrides is None:
            result = smoke_run[1]
        else:
            result = launch(smoke_config(storage, deep_merge(deep_merge(_SHORT, {"name": name}), overrides)),
                            verbose=False)
        checkpoint = latest_checkpoint(result.run_dir)
        exported = export_checkpoint(checkpoint, storage / f"{name}_export")
        out[name] = (result, checkpoint, exported)
    return out


def _eval_json(capsys, path: Path, *extra: str) -> dict[str, float]:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _assert_same_metrics(got: dict[str, float], want: dict[str, float]) -> None:
    assert want, "the run reported no final metrics"
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(_RUNS))
def test_exported_model_reproduces_final_metrics(name, trained, capsys):
    result, checkpoint, exported = trained[name]
    assert read_run_state(checkpoint).step == result.step == (30 if name == "zero2" else 6)
    _assert_same_metrics(_eval_json(capsys, exported), result.final_metrics)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(_RUNS))
def test_exported_weights_are_the_fp32_training_weights(name, trained):
    result, _, exported = trained[name]
    assert is_exported(exported)
    model, _, config = load_exported(exported)  # strict load inside
    state = torch.load(exported / "model.pt", weights_only=True)
    fresh = create_model("micro").state_dict()
    assert sorted(state) == sorted(fresh)
    for key, value in state.items():
        assert type(value) is torch.Tensor and value.dtype == torch.float32 and value.is_contiguous(), key
        assert value.shape == fresh[key].shape, key  # the temperature is 0-dim again, not [1]
        assert torch.isfinite(value).all(), key
    moved = [k for k in state if not torch.equal(state[k], fresh[k])]
    assert len(moved) > 0.9 * len(state)  # trained: almost every tensor left its initial value
    assert not model.training and config["step"] == result.step and config["model"]["name"] == "micro"
    assert config["experiment"]["train"]["zero_stage"] == int(name[-1])
    assert config["weights"] == ("module" if name == "zero0" else "zero_to_fp32")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero2_masters_equal_the_saved_module_weights(trained):
    # Under ZeRO-2 fp32 the engine's module parameters are copied from the fp32 master partitions
    # after every step, and rank 0 saves the full module: a second, independent copy of the same numbers.
    _, checkpoint, exported = trained["zero2"]
    tag = checkpoint / DS_SUBDIR / DS_TAG
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    state = torch.load(exported / "model.pt", weights_only=True)
    assert sorted(module) == sorted(state)
    for key, value in state.items():
        assert torch.equal(module[key].reshape(value.shape), value), key


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_of_raw_checkpoint_equals_eval_of_its_export(trained, capsys):
    result, checkpoint, exported = trained["zero3"]
    raw = _eval_json(capsys, checkpoint)
    assert raw == _eval_json(capsys, exported)
    # The run folder stands for its latest checkpoint.
    assert _eval_json(capsys, result.run_dir) == raw


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_flags_override_the_config_sets(trained, smoke_world, capsys):
    result, _, exported = trained["zero2"]
    got = _eval_json(capsys, exported, "--set", f"test={smoke_world / 'eval' / 'test'}", "--shifted",
                     "--retrieval", str(smoke_world / "eval" / "retrieval"))
    assert not any(k.startswith(("eval/zeroshot/v2", "eval/zeroshot/sketch", "eval/zeroshot/robustness"))
                   for k in got)
    want = {k: v for k, v in result.final_metrics.items() if k in got}
    assert len(want) == len(got)
    _assert_same_metrics(got, want)
    # The table form shows the same keys.
    assert main(["eval", "--checkpoint", str(exported)]) == 0
    table = capsys.readouterr().out
    assert all(key in table for key in result.final_metrics)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_missing_set_dir_exits_2(trained, tmp_path, capsys):
    _, _, exported = trained["zero2"]
    missing = tmp_path / "nope"
    assert main(["eval", "--checkpoint", str(exported), "--set", f"x={missing}"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_eval_and_export_of_a_non_checkpoint_folder_exit_2(tmp_path, capsys):
    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    (folder / "stray.txt").write_text("x")
    assert main(["eval", "--checkpoint", str(folder)]) == 2
    assert str(folder) in capsys.readouterr().err
    assert main(["export", str(folder), str(tmp_path / "out")]) == 2
    assert str(folder) in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.pt").exists()
    missing = tmp_path / "missing"
    assert main(["eval", "--checkpoint", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_export_refuses_a_checkpoint_without_deepspeed_state(tmp_path):
    from dataclasses import asdict

    from scalelab.train.checkpoint import META_NAME, RunState

    (tmp_path / META_NAME).write_text(json.dumps(asdict(RunState())))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / DS_SUBDIR)):
        export_checkpoint(tmp_path, tmp_path / "out")


def test_load_exported_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_exported(tmp_path)


# A real single-process DeepSpeed engine (no Ray) in a subprocess, so its process group and DeepSpeed's
# global state stay out of this test process: one bf16 ZeRO-0 optimizer step, then a scalelab checkpoint.
_BF16_ZERO0 = """
import json, os, sys
from dataclasses import asdict
from pathlib import Path
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import torch
from scalelab.config import ExperimentConfig, validate
from scalelab.models import create_model
from scalelab.train.checkpoint import RankState, RunState, save_checkpoint
from scalelab.train.engine import build_engine
cfg = validate(ExperimentConfig, json.loads(sys.argv[1]))
torch.manual_seed(0)
engine, optimizer = build_engine(create_model(cfg.model.preset), cfg, world_size=1)
engine.set_gradient_accumulation_boundary(True)
engine.backward(sum((p.float() ** 2).sum() for p in engine.module.parameters()), scale_wrt_gas=False)
engine.step()
# The reference: fp32 masters named through the optimizer's own (master, model parameter) pairing.
names = {id(p): n for n, p in engine.module.named_parameters()}
masters = {names[id(p)]: m.detach().clone() for mg, pg in zip(optimizer.fp32_groups, optimizer.fp16_groups)
           for m, p in zip(mg, pg)}
out = Path(sys.argv[2])
save_checkpoint(engine, out, RunState(step=1, config=cfg.to_dict()), RankState(), rank=0)
torch.save(masters, out / "reference_masters.pt")
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bf16_zero0_export_takes_the_fp32_masters(smoke_config, tmp_path):
    import socket
    import subprocess
    import sys

    cfg = smoke_config(tmp_path, {"train": {"zero_stage": 0, "precision": "bf16", "num_workers": 1}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    checkpoint = tmp_path / "step_00000001"
    subprocess.run([sys.executable, "-c", _BF16_ZERO0, json.dumps(cfg.to_dict()), str(checkpoint), str(port)],
                   check=True, cwd=REPO)
    exported = export_checkpoint(checkpoint, tmp_path / "out")
    state = torch.load(exported / "model.pt", weights_only=True)
    masters = torch.load(checkpoint / "reference_masters.pt", weights_only=True)
    assert sorted(state) == sorted(masters)
    for key, value in state.items():
        assert torch.equal(value, masters[key].reshape(value.shape)), key
    assert json.loads((exported / "config.json").read_text())["weights"] == "fp32_groups"
    # The masters really hold more than the bf16 module: at least some differ from their bf16 rounding.
    assert any(not torch.equal(v, v.bfloat16().float()) for v in state.values())
