"""Sweep configs: validation, expansion into trial experiments, budgets, micro-batch rules (no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from scalelab.config import ConfigError
from scalelab.models import activation_bytes_per_sample, preset_stats
from scalelab.sweep.config import expand, load_sweep

REPO = Path(__file__).resolve().parents[2]


def _sweep(tmp_path, **changes) -> tuple:
    base = yaml.safe_load((REPO / "experiments" / "smoke.yaml").read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": "s", "base": "base.yaml",
        "axes": {"data": [256, 512], "model": ["micro", "tiny"], "batch": [32, 64]},
        "budget": {"kind": "samples", "value": 1000}, "micro_batch": {"size": 16},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 0.5},
    }
    for key, value in changes.items():
        sweep[key] = value
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return load_sweep(tmp_path / "sweep.yaml")


def test_grid_expands_to_one_validated_trial_per_point(tmp_path):
    sweep, base = _sweep(tmp_path, grid={"optim.lr": [1e-3, 3e-3]})
    trials = expand(sweep, base)
    assert len(trials) == 16
    names = [t.name for t in trials]
    assert len(set(names)) == 16 and "d256-micro-b32-lr0.001" in names
    t = next(t for t in trials if t.name == "d512-tiny-b64-lr0.003")
    cfg = t.experiment
    assert (cfg.data.n_pairs, cfg.model.preset, cfg.train.global_batch) == (512, "tiny", 64)
    assert cfg.optim.lr == 3e-3
    assert cfg.name == "s--d512-tiny-b64-lr0.003" and cfg.train.num_workers == 2
    assert cfg.train.steps == math.ceil(1000 / 64) and cfg.train.micro_batch_size == 16
    assert cfg.run.storage.endswith("s/trials")


def test_budget_kinds_set_the_steps(tmp_path):
    sweep, base = _sweep(tmp_path, budget={"kind": "epochs", "value": 2})
    steps = {t.name: t.experiment.train.steps for t in expand(sweep, base)}
    assert steps["d512-micro-b32"] == math.ceil(2 * 512 / 32)
    assert steps["d256-tiny-b64"] == math.ceil(512 / 64)
    macs = 1e12
    sweep, base = _sweep(tmp_path, budget={"kind": "compute", "value": macs})
    for t in expand(sweep, base):
        per_sample = 4 * preset_stats(t.model).macs_per_sample
        assert t.experiment.train.steps == math.ceil(macs / per_sample / t.batch)  # equal compute per trial
    sweep, base = _sweep(tmp_path, budget={"kind": "steps", "value": 40})
    trials = expand(sweep, base)
    assert {t.experiment.train.steps for t in trials} == {40}  # equal steps: a bigger batch sees more
    assert {t.batch for t in trials} == {32, 64}


def test_auto_micro_batch_is_the_largest_power_of_two_in_the_memory_budget(tmp_path):
    per_sample = {"micro": activation_bytes_per_sample("micro"), "tiny": activation_bytes_per_sample("tiny")}
    sweep, base = _sweep(tmp_path, micro_batch={"memory_mb": 8})
    for t in expand(sweep, base, bytes_per_sample=per_sample):
        fits = int(8 * 2**20 // per_sample[t.model])
        want = min(t.batch // 2, 2 ** int(math.log2(fits)))
        assert t.experiment.train.micro_batch_size == want


def test_activation_bytes_match_a_real_forward():
    """The meta-device count equals the saved-tensor bytes of a real CPU forward (batch 3 − batch 2)."""
    import torch

    from scalelab.models import create_model

    model = create_model("micro").train()

    def saved(batch: int) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        images = torch.randn(batch, 3, 32, 32)
        tokens = torch.ones(batch, 32, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.encode_image(images)
            model.encode_text(tokens)
        return total

    real = saved(3) - saved(2)
    meta = activation_bytes_per_sample("micro")
    assert meta > 0
    # The CPU kernel of scaled-dot-product attention saves less than its meta decomposition (an upper bound).
    assert 0.5 * meta <= real <= meta


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"axes": {"data": [256, 256], "model": ["micro"], "batch": [32]}}, "repeats a value"),
        ({"grid": {"train.global_batch": [32]}}, "set by the axes"),
        ({"micro_batch": {"size": 16, "memory_mb": 100}}, "exactly one of"),
        ({"axes": {"data": [256], "model": ["nope"], "batch": [32]}}, "unknown preset 'nope'"),
        ({"axes": {"data": [256], "model": ["micro"], "batch": [33]}}, "not divisible by workers_per_trial"),
        ({"base": "missing.yaml"}, "base experiment"),
        ({"budget": {"kind": "flops", "value": 1}}, "budget.kind"),
    ],
)
def test_bad_sweeps_are_refused_with_the_field_named(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        sweep, base = _sweep(tmp_path, **changes)
        expand(sweep, base)


def test_relative_storage_inside_a_ray_job_needs_a_root(tmp_path, monkeypatch):
    from scalelab.sweep.runner import resolve_root

    sweep, _ = _sweep(tmp_path, storage="runs")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "x"}}))
    monkeypatch.delenv("SCALELAB_ROOT", raising=False)
    with pytest.raises(ConfigError, match="temporary working dir"):
        resolve_root(sweep)
    monkeypatch.setenv("SCALELAB_ROOT", str(tmp_path))
    assert resolve_root(sweep).storage == str(tmp_path / "runs")


def test_recipes_are_a_grid_key_of_named_changes(tmp_path):
    """BASIC's two-stage recipes (or any bundle of settings) as one more grid key: each trial gets its
    recipe's changes, its name ends in the recipe's, results carry it as `extra:recipe`."""
    recipes = {"adamw": {}, "lion": {"optim": {"name": "lion", "lr": 3e-4, "weight_decay": 1.0}}}
    sweep, base = _sweep(tmp_path, recipes=recipes, grid={"optim.warmup_steps": [0, 5]})
    trials = expand(sweep, base)
    assert len(trials) == 2 * 2 * 2 * 2 * 2
    t = next(t for t in trials if t.name == "d256-micro-b32-warmup_steps5-lion")
    assert t.extra == {"recipe": "lion", "optim.warmup_steps": 5}
    optim = t.experiment.optim
    assert (optim.name, optim.lr, optim.weight_decay) == ("lion", 3e-4, 1.0)
    assert t.experiment.optim.warmup_steps == 5
    plain = next(t for t in trials if t.name == "d256-micro-b32-warmup_steps5-adamw")
    assert (plain.experiment.optim.name, plain.experiment.optim.lr) == (base["optim"]["name"],
                                                                         base["optim"]["lr"])


@pytest.mark.parametrize(
    ("recipes", "grid", "message"),
    [
        ({"big": {"model": {"preset": "tiny"}}}, {}, r"recipe 'big' sets \['model.preset'\]"),
        ({"LiT": {}}, {}, "lower-case"),
        ({"a": {}}, {"recipe": ["a"]}, "recipes'"),
        ({"a": {"optim": {"nme": "lion"}}}, {}, "trial d256-micro-b32-a: optim.nme"),
    ],
)
def test_bad_recipes_are_refused(tmp_path, recipes, grid, message):
    with pytest.raises(ConfigError, match=message):
        sweep, base = _sweep(tmp_path, recipes=recipes, grid=grid)
        expand(sweep, base)
