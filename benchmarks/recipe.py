"""BASIC's two-stage recipe on the synthetic world: does a label-pretrained image tower help?

    python benchmarks/recipe.py                    # stage 1 (2000 steps) + three stage-2 recipes (600)
    python benchmarks/recipe.py --stage1-steps 300 # a weakly pretrained tower

What is run, all through the public CLI on the easy synthetic world (runs/data/demo-easy, generated with
its labelled set when missing; the labelled set is written into it when only that is missing):
1. stage 1: `scalelab train experiments/demo-classify.yaml` — the micro preset's image tower + a softmax
   head on 8000 labelled images of the world's 23 classes (disjoint from the image-text pairs), its
   top-1 on the held-out `test`, `v2` and `sketch` splits;
2. stage 2: `scalelab sweep sweeps/recipe.yaml` — contrastive training of the micro dual encoder on 8000
   pairs, batch 128, equal steps, recipes `scratch` (both towers from random init), `lit` (the image
   tower from stage 1, locked: LiT) and `unlocked` (from stage 1, trained at half the lr).
The table: zero-shot top-1 on `test`, the robustness average over the shifted sets, and the mean time
inside a training step (MLflow `train/time/total_s`) relative to `scratch`. Everything in a temporary
storage folder; the numbers are deterministic for a given machine (seeded), the times are not.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "runs" / "data" / "demo-easy"


def _scalelab(*args: str) -> str:
    cmd = [sys.executable, "-m", "scalelab.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def _world() -> None:
    if not (WORLD / "manifest.json").exists():
        _scalelab("data", "synth", str(WORLD), "--level", "easy", "--n-pairs", "8000",
                  "--eval-per-class", "20", "--retrieval-pairs", "500", "--labelled", "8000")
        _scalelab("data", "tokenizer", str(WORLD), "--kind", "bpe", "--vocab-size", "1000")
    elif not (WORLD / "labelled" / "manifest.json").exists():
        from scalelab.data.synth.labelled import generate_labelled

        generate_labelled(WORLD / "labelled", n=8000, seed=0, image_size=32, level="easy", workers=2)


def _metric(uri: str, run_name: str, key: str) -> list[float]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"attributes.run_name = '{run_name}'")
    return [m.value for m in client.get_metric_history(runs[0].info.run_id, key)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage1-steps", type=int, default=2000)
    parser.add_argument("--stage2-steps", type=int, default=600)
    args = parser.parse_args()
    started = time.monotonic()
    _world()
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        storage = Path(tmp)
        _scalelab("train", "experiments/demo-classify.yaml", "--ray", "local",
                  "--set", f"run.storage={storage}", "--set", f"train.steps={args.stage1_steps}",
                  "--set", "eval.every_steps=null")
        uri = f"sqlite:///{storage / 'mlflow.db'}"
        stage1 = {s: _metric(uri, "demo-classify", f"eval/classify/{s}/top1")[-1]
                  for s in ("test", "v2", "sketch")}
        stage1_run = storage / "demo-classify"
        _scalelab("sweep", "sweeps/recipe.yaml", "--ray", "local", "--set", f"storage={storage}",
                  "--set", f"budget.value={args.stage2_steps}",
                  "--set", f"recipes.lit.model.image.init={stage1_run}",
                  "--set", f"recipes.unlocked.model.image.init={stage1_run}")
        _scalelab("plot", str(storage / "recipe"))  # results.csv into <sweep>/analysis
        with (storage / "recipe" / "analysis" / "results.csv").open() as f:
            rows = list(csv.DictReader(f))
        step_s = {}
        for row in rows:
            recipe = row["extra:recipe"].strip('"')
            times = _metric(uri, f"recipe--{row['trial_id']}", "train/time/total_s")
            step_s[recipe] = statistics.mean(times[1:])  # the first logged step includes the warm-up
        print(f"\nstage 1 (classify, micro, {args.stage1_steps} steps, 8000 labelled images, 23 classes): "
              + ", ".join(f"{s} top-1 {v:.3f}" for s, v in stage1.items()))
        print(f"\nstage 2 (contrastive, micro, batch 128, {args.stage2_steps} steps, 8000 pairs)\n")
        print("| recipe | zero-shot top-1 (test) | robustness avg top-1 | s / step inside | vs scratch |")
        print("|---|---|---|---|---|")
        for row in rows:
            recipe = row["extra:recipe"].strip('"')
            print(f"| {recipe} | {float(row['metric:eval/zeroshot/test/top1']):.3f} | "
                  f"{float(row['metric:eval/zeroshot/robustness_avg/top1']):.3f} | {step_s[recipe]:.4f} | "
                  f"{step_s[recipe] / step_s['scratch']:.2f} |")
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
