"""`scalelab demo`'s world handling: it builds the easy world only when the one on disk is not it.

The demo sweep itself is `make demo` (minutes on 2 cores; its numbers are in the README); the sweep
machinery it runs is tested by tests/sweep/test_sweep.py."""

import json
from pathlib import Path

from scalelab.cli import main
from scalelab.data.synth import generate_world
from scalelab.data.tokenizer import train_tokenizer
from scalelab.sweep.config import load_sweep
from scalelab.sweep.demo import WORLD, world_problem


def test_world_problem_names_what_is_missing(tmp_path):
    world = tmp_path / "w"
    assert world_problem(world, 10) == "missing"
    generate_world(world, n_pairs=10, samples_per_shard=5, progress=False, eval_per_class=0,
                   retrieval_pairs=0)
    assert "level is 'standard'" in world_problem(world, 10)
    generate_world(world, n_pairs=10, samples_per_shard=5, progress=False, eval_per_class=0,
                   retrieval_pairs=0, level=WORLD["level"])
    assert "has 10 pairs, the sweep needs 20" in world_problem(world, 20)
    assert world_problem(world, 10) == "its tokenizer is missing"
    train_tokenizer(world, kind="bpe", vocab_size=100)
    assert world_problem(world, 10) == "its eval sets are missing"
    generate_world(world, n_pairs=10, samples_per_shard=5, progress=False, eval_per_class=1,
                   retrieval_pairs=0, level=WORLD["level"])
    assert world_problem(world, 10) is None
    manifest = world / "manifest.json"
    saved = json.loads(manifest.read_text())
    saved["extra"]["synth"]["level_spec"]["fixed"].pop("size")  # as if made before a level change
    manifest.write_text(json.dumps(saved))
    assert "older definition" in world_problem(world, 10)


def test_the_demo_sweep_is_a_valid_grid_with_three_values_per_axis_on_the_demo_world():
    sweep, base = load_sweep(Path(__file__).resolve().parents[2] / "sweeps" / "demo.yaml")
    assert all(len(getattr(sweep.axes, axis)) >= 3 for axis in ("data", "model", "batch"))
    assert base["data"]["sources"] == [{"path": "runs/data/demo-easy"}] and base["data"]["cache"] is True


def test_demo_without_its_sweep_file_exits_2(tmp_path, capsys):
    assert main(["demo", "--sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "no such sweep file" in capsys.readouterr().err
