"""deepspeed_config: fields per stage and precision, gradient-cache geometry, refusals."""

import subprocess
import sys

import pytest

from scalelab.config import ConfigError, OptimConfig, TrainConfig
from scalelab.train.ds_config import batch_geometry, deepspeed_config
from scalelab.train.optim import OPTIMIZERS


def _cfg(train, optim=None, world=1):
    calls = batch_geometry(train, world).backward_calls
    return deepspeed_config(train, optim or OptimConfig(), micro_batches=calls, world_size=world)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fields_for_each_stage_and_precision(stage, precision):
    train = TrainConfig(global_batch=256, micro_batch_size=64, zero_stage=stage, precision=precision)
    cfg = _cfg(train, OptimConfig(grad_clip=1.0), world=2)
    assert cfg["zero_optimization"] == {"stage": stage}
    assert cfg["bf16"] == {"enabled": precision == "bf16"}
    assert cfg["fp16"] == {"enabled": False}
    assert cfg["train_micro_batch_size_per_gpu"] == 64
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 256
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_allow_untested_optimizer"] is True
    assert cfg["wall_clock_breakdown"] is False
    assert cfg["steps_per_print"] >= 10**6
    assert "optimizer" not in cfg and "scheduler" not in cfg


def test_gradient_clipping_is_explicit_zero_when_disabled():
    assert _cfg(TrainConfig(), OptimConfig(grad_clip=None))["gradient_clipping"] == 0.0


def test_uneven_division_gas_equals_micro_batch_count():
    train = TrainConfig(global_batch=200, micro_batch_size=64)  # per rank 100 → 64 + 36
    geo = batch_geometry(train, 2)
    assert (geo.per_rank_batch, geo.image_micro_batches, geo.backward_calls) == (100, 2, 2)
    cfg = deepspeed_config(train, OptimConfig(), micro_batches=2, world_size=2)
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * 2 * 2 == 200
    odd = TrainConfig(global_batch=7, micro_batch_size=3)  # 3 + 3 + 1
    cfg = _cfg(odd)
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * 3 >= 7


def test_text_micro_batch_sets_the_backward_count():
    train = TrainConfig(global_batch=128, micro_batch_size=64, text_micro_batch_size=16)
    geo = batch_geometry(train, 1)
    assert (geo.image_micro_batches, geo.text_micro_batches, geo.backward_calls) == (2, 8, 8)
    assert _cfg(train)["gradient_accumulation_steps"] == 8


def test_a_locked_image_tower_calls_backward_per_text_micro_batch():
    geo = batch_geometry(TrainConfig(global_batch=96, micro_batch_size=16, text_micro_batch_size=32), 2)
    assert (geo.image_micro_batches, geo.text_micro_batches, geo.backward_calls) == (3, 2, 3)
    assert (geo.calls_for(image_locked=True), geo.calls_for(image_locked=False)) == (2, 3)


def test_bad_geometry_is_refused():
    train = TrainConfig(global_batch=100, micro_batch_size=64)
    with pytest.raises(ConfigError, match="divisible by the world size 3"):
        deepspeed_config(train, OptimConfig(), micro_batches=1, world_size=3)
    with pytest.raises(ConfigError, match="micro_batches=1 does not match"):
        deepspeed_config(train, OptimConfig(), micro_batches=1, world_size=1)  # needs 2
    with pytest.raises(ConfigError, match="world_size"):
        deepspeed_config(train, OptimConfig(), micro_batches=2, world_size=0)


def test_deepspeed_accepts_the_config():
    """DeepSpeed's own config parser (no engine, no process group: world size 1) takes the dict."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16"):
            train = TrainConfig(global_batch=7, micro_batch_size=3, zero_stage=stage, precision=precision)
            parsed = ds_config.DeepSpeedConfig(_cfg(train, OptimConfig(grad_clip=None)))
            assert parsed.gradient_accumulation_steps == 3
            assert parsed.gradient_clipping == 0.0
            assert parsed.zero_optimization_stage == stage
            assert parsed.zero_allow_untested_optimizer is True
            assert parsed.bfloat16_config.enabled is (precision == "bf16")


def test_engine_free_modules_import_no_framework():
    mods = "scalelab.train, scalelab.train.optim, scalelab.train.schedule, scalelab.train.ds_config, " \
        "scalelab.train.compute"
    code = f"import sys, {mods}\nprint(sorted(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_only_adafactor_bv_is_refused_and_only_where_deepspeed_flattens(name, stage, precision):
    """ZeRO-1/2/3 flatten, in either precision; ZeRO-0 does not (ds_config and optim docstrings)."""
    train = TrainConfig(global_batch=8, micro_batch_size=8, zero_stage=stage, precision=precision)
    optim = OptimConfig(name=name)
    if name == "adafactor_bv" and stage > 0:
        with pytest.raises(ConfigError) as error:
            _cfg(train, optim)
        text = str(error.value)
        assert text.startswith(f"optim.name=adafactor_bv cannot run with train.zero_stage={stage}: "
                               f"ZeRO-{stage} steps the optimizer on flat 1-D partitions")
        assert "factored" in text and "train.zero_stage=0" in text
    else:
        assert _cfg(train, optim)["zero_optimization"] == {"stage": stage}
