"""`scalelab demo` (`make demo`): the demo sweep end to end on this machine.

Builds the easy synthetic world the demo sweep's base experiment points at when it is missing (or is
not the easy world, or is smaller than the sweep's largest data value), trains its tokenizer, then runs
the sweep on local Ray with local MLflow — resumable like any sweep: run it again after an interruption.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from scalelab.config import ConfigError

__all__ = ["DEMO_SWEEP", "WORLD", "ensure_world", "run_demo", "world_problem"]

DEMO_SWEEP = "sweeps/demo.yaml"
# How `make demo` builds its world: the easy level (see scalelab.data.synth.world.LEVELS), a BPE
# tokenizer (whole words: the class names in prompts are the tokens the captions taught).
WORLD: dict[str, Any] = {"level": "easy", "eval_per_class": 20, "retrieval_pairs": 500, "seed": 0}
TOKENIZER: dict[str, Any] = {"kind": "bpe", "vocab_size": 1000}


def world_problem(path: Path, n_pairs: int) -> str | None:
    """Why `path` is not (yet) the demo's world, or None when it is."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "missing"
    synth = json.loads(manifest.read_text()).get("extra", {}).get("synth", {})
    from scalelab.data.synth import world_level

    if synth.get("level") != WORLD["level"]:
        return f"its level is {synth.get('level', 'unknown')!r}, the demo needs {WORLD['level']!r}"
    if synth.get("level_spec") != json.loads(json.dumps(world_level(WORLD["level"]).spec())):
        return f"it was made by an older definition of the {WORLD['level']!r} level"
    if int(synth.get("n_pairs", 0)) < n_pairs:
        return f"it has {synth.get('n_pairs')} pairs, the sweep needs {n_pairs}"
    if not (path / "tokenizer.json").is_file():
        return "its tokenizer is missing"
    if not (path / "eval" / "test" / "classnames.txt").is_file():
        return "its eval sets are missing"
    return None


def ensure_world(path: Path, n_pairs: int) -> None:
    """Generate the easy world (n_pairs training pairs + eval sets) and its tokenizer at `path` unless
    they are there already."""
    problem = world_problem(path, n_pairs)
    if problem is None:
        print(f"[demo] world: {path} ({n_pairs} pairs, level {WORLD['level']})")
        return
    from scalelab.data.synth import generate_world
    from scalelab.data.tokenizer import train_tokenizer

    print(f"[demo] generating the synthetic world in {path} ({problem}) ...")
    generate_world(path, n_pairs=n_pairs, workers=os.cpu_count() or 1, progress=False, **WORLD)
    train_tokenizer(path, **TOKENIZER)


def run_demo(sweep_file: str | Path = DEMO_SWEEP, *, ray_address: str | None = None,
             verbose: bool = False) -> int:
    """Ensure the world, run (or resume) the sweep; the sweep prints its table, fits and MLflow link."""
    from scalelab.sweep.config import load_sweep
    from scalelab.sweep.runner import run_sweep

    sweep_file = Path(sweep_file)
    if not sweep_file.is_file():
        raise ConfigError(f"{sweep_file}: no such sweep file (run the demo from the repository root)")
    sweep, base = load_sweep(sweep_file)
    sources = base.get("data", {}).get("sources") or []
    if len(sources) != 1:
        raise ConfigError(f"{sweep_file}: the demo's base experiment must read exactly one data source")
    ensure_world(Path(sources[0]["path"]).resolve(), max(sweep.axes.data))
    run_sweep(sweep, base, ray_address=ray_address, verbose=verbose)
    return 0
