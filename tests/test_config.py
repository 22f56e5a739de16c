"""Typed configs: YAML in, validated, dot overrides, flat params out; clear errors on bad input."""

import re

import pytest

from scalelab.config import (
    ConfigError,
    ExperimentConfig,
    TextTowerConfig,
    flatten,
    load_experiment,
    parse_overrides,
    resolve_paths,
)


def test_defaults_validate_and_are_frozen():
    cfg = load_experiment()
    assert isinstance(cfg, ExperimentConfig)
    with pytest.raises(Exception, match="frozen"):
        cfg.train.global_batch = 3  # type: ignore[misc]


def test_yaml_and_dot_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\ntrain:\n  global_batch: 128\n  micro_batch_size: 16\nloss:\n  kind: sigmoid\n")
    cfg = load_experiment(path, ["train.micro_batch_size=8", "loss.block_size=32",
                                 "model.overrides.text.dropout=0.1", "optim.betas=[0.9, 0.95]"])
    assert cfg.train.global_batch == 128
    assert cfg.train.micro_batch_size == 8
    assert cfg.loss.kind == "sigmoid" and cfg.loss.block_size == 32
    assert cfg.model.overrides == {"text": {"dropout": 0.1}}
    assert cfg.optim.betas == (0.9, 0.95)


def test_to_dict_round_trips_and_flattens():
    cfg = load_experiment(None, ["model.overrides.text.dropout=0.2"])
    again = ExperimentConfig.model_validate(cfg.to_dict())
    assert again == cfg
    flat = flatten(cfg.to_dict())
    assert flat["train.global_batch"] == cfg.train.global_batch
    assert flat["model.overrides.text.dropout"] == 0.2
    assert flat["optim.betas"] == "[0.9, 0.98]"
    assert all("." in k or k in ("name", "task") for k in flat)


def test_unknown_field_names_the_field_and_allowed_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["train.globl_batch=64"])
    msg = str(err.value)
    assert "train.globl_batch" in msg
    assert "unknown field" in msg and "global_batch" in msg and "micro_batch_size" in msg


def test_micro_batch_must_be_positive():
    for bad in ("0", "-4"):
        with pytest.raises(ConfigError) as err:
            load_experiment(None, [f"train.micro_batch_size={bad}"])
        assert "train.micro_batch_size" in str(err.value)
        assert "greater than 0" in str(err.value)


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["loss.kind=hinge"])
    msg = str(err.value)
    assert "loss.kind" in msg and "'softmax'" in msg and "'sigmoid'" in msg and "hinge" in msg
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_experiment(None, ["train.zero_stage=5"])


def test_batch_not_divisible_by_workers():
    with pytest.raises(ConfigError, match="divisible by train.num_workers"):
        load_experiment(None, ["train.global_batch=10", "train.num_workers=4"])


def test_text_heads_must_divide_width():
    with pytest.raises(ValueError, match="must divide"):
        TextTowerConfig(vocab_size=10, context_length=4, width=10, depth=1, heads=3)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_experiment(path)


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        parse_overrides([bad])


def test_override_values_are_typed():
    assert parse_overrides(["a.b=3", "a.c=true", "d=null", "e=text"]) == {
        "a": {"b": 3, "c": True}, "d": None, "e": "text"}


def test_errors_inside_list_fields_name_the_element():
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["data.sources=[{path: a, wieght: 2}]"])
    assert "data.sources.0.wieght: unknown field; allowed: path, weight" in str(err.value)
    with pytest.raises(ConfigError, match="crop_scale"):
        load_experiment(None, ["data.crop_scale=[0.9, 0.2]"])
    with pytest.raises(ConfigError, match="data.sources"):
        load_experiment(None, ["data.sources=[]"])


@pytest.mark.parametrize(("image", "message"), [
    ({"unlock_at_step": 5}, "model.image.unlock_at_step needs model.image.lock: true"),
    ({"lock": True, "lr_mult": 0.1}, "model.image.lr_mult=0.1 has no effect on a tower locked for the whole"),
    ({"lr_mult": 0}, "model.image.lr_mult: Input should be greater than 0"),
    ({"lock": True, "unlock_at_step": 0}, "model.image.unlock_at_step: Input should be greater than 0"),
    ({"init": " "}, "model.image.init is empty"),
])
def test_image_combinations_are_refused_naming_the_field(image, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment(overrides=[f"model.image.{k}={v}" for k, v in image.items()])


def test_image_settings_validate_and_init_becomes_absolute(tmp_path):
    cfg = load_experiment(overrides=["model.image.init=weights/vit.safetensors", "model.image.lock=true",
                                     "model.image.unlock_at_step=100", "model.image.lr_mult=0.1"])
    assert (cfg.model.image.lock, cfg.model.image.unlock_at_step, cfg.model.image.lr_mult) == (True, 100, 0.1)
    assert flatten(cfg.to_dict())["model.image.init"] == "weights/vit.safetensors"
    resolved = resolve_paths(cfg, tmp_path)
    assert resolved.model.image.init == str(tmp_path / "weights" / "vit.safetensors")
    assert resolved.model.image.lock and resolved.model.preset == cfg.model.preset
    assert load_experiment().model.image.init is None  # the default: a random tower, trained


def test_every_shipped_experiment_validates_and_basic_stage_2_names_stage_1():
    """experiments/*.yaml all load; each BASIC stage-2 config starts its image tower from the folder its
    stage-1 config writes (<run.storage>/<name>), and the two stages build the same image tower."""
    from pathlib import Path

    from scalelab.config import load_experiment
    from scalelab.models import get_spec

    root = Path(__file__).resolve().parents[1] / "experiments"
    configs = {p.stem: load_experiment(p, []) for p in sorted(root.glob("*.yaml"))}
    assert {"demo", "demo-classify", "smoke"} <= set(configs)
    for size in ("s", "m", "l"):
        stage1, stage2 = configs[f"basic-{size}-stage1"], configs[f"basic-{size}"]
        assert (stage1.task, stage2.task) == ("classify", "contrastive")
        assert stage2.model.image.init == str(Path(stage1.run.storage) / stage1.name)
        assert stage2.model.image.lock
        one, two = (get_spec(c.model.preset, **c.model.overrides).image for c in (stage1, stage2))
        assert one == two and stage1.data.image_size == stage2.data.image_size
