"""Loop overhead: wall time per training step in a real run, logging included, against the time inside
the step, with Ray Train's default worker poll (2 s) and with scalelab's (0.1 s), side by side.

    python benchmarks/loop.py                 # demo presets and batches, log_every 10, 1 and 2 trials
    python benchmarks/loop.py --quick         # nano, batch 64 only
    python benchmarks/loop.py --polls scalelab --code before=/path/to/old/checkout --code now=.
                                              # two versions of scalelab, row by row

Why: Ray Train's controller collects a worker's `ray.train.report` when it polls the workers, every
`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S` (2 s by default), and a worker's next report blocks until the
previous one was collected. A run that reports every 10 steps of 20 ms therefore waits up to ~2 s per
report. scalelab's `launch` sets the interval to 0.1 s (train/launch.py).

What is measured, per row: real `scalelab` runs (`launch`: Ray Train worker, DeepSpeed ZeRO-2, MLflow
on sqlite, cached data) of the demo's setup on an easy synthetic world, `--steps` steps, reporting every
`--log-every` steps, no evaluation, a checkpoint at the end only. `wall s/step` = (MLflow timestamp of
the last logged step − that of the first) / steps between them: everything the worker does, logging,
reports and waiting included. `in-step s` = the mean of `train/time/total_s` (the time inside
`train_step`) over the logged steps after the first (the mean, not the median: the wall time pays for
every slow step too). `ratio` = wall / in-step (1.00 = no overhead). With `trials 2`,
two runs of the row train at once on the same local Ray (0.75 CPU each), each its own driver process,
and the row gives the larger ratio of the two.

`--code LABEL=ROOT` (repeatable) runs every row once per source tree: `ROOT/platform` goes first on
PYTHONPATH of a Ray instance started for that row and of its `scalelab train` processes, so driver and
workers run that tree's code (the installed dependencies are shared).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Ray Train's worker poll interval (s): its default, an intermediate one, scalelab's.
POLLS = {"ray-default": "2.0", "0.5": "0.5", "scalelab": "0.1"}


def _world(root: Path) -> Path:
    from scalelab.data.synth import generate_world
    from scalelab.data.tokenizer import train_tokenizer

    out = root / "world"
    generate_world(out, n_pairs=1024, seed=0, image_size=32, samples_per_shard=512, progress=False,
                   eval_per_class=2, retrieval_pairs=16, level="easy")
    train_tokenizer(out, vocab_size=1000, kind="bpe")
    return out


def _experiment(world: Path, storage: Path, name: str, preset: str, batch: int, args) -> dict:
    repo = Path(__file__).resolve().parents[1]
    exp = yaml.safe_load((repo / "experiments" / "demo.yaml").read_text())
    exp["name"] = name
    exp["model"]["preset"] = preset
    exp["data"].update({"sources": [{"path": str(world)}], "n_pairs": 1024})
    exp["train"].update({"global_batch": batch, "micro_batch_size": min(batch, 64), "steps": args.steps,
                         "cpus_per_worker": 0.75})
    exp["eval"] = {"sets": {}, "shifted": [], "retrieval": None}
    exp["run"] = {"storage": str(storage), "log_every": args.log_every, "checkpoint_every": args.steps}
    return exp


def _measure(uri: str, name: str) -> tuple[float, float]:
    """(wall s per step between the first and last logged step, mean in-step s) from MLflow."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("scalelab")
    [run] = client.search_runs([experiment.experiment_id], f"tags.`scalelab.run_key` = '{name}'")
    losses = sorted((m.step, m.timestamp) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    (first, t0), (last, t1) = losses[0], losses[-1]
    history = client.get_metric_history(run.info.run_id, "train/time/total_s")
    inside = sorted((m.step, m.value) for m in history)
    return (t1 - t0) / 1000 / (last - first), statistics.mean(v for s, v in inside if s > first)


def _run_rows(world: Path, root: Path, presets: list[str], batches: list[int], trials: list[int], args):
    rows = []
    for n_trials in trials:
        for preset in presets:
            for batch in batches:
                for code, tree in args.code:
                    for label in args.polls:
                        with _ray(tree):
                            row = _row(world, root / code, preset, batch, n_trials, label, POLLS[label], args)
                        rows.append({**row, "code": code})
                        print(_format(rows[-1]), flush=True)
    return rows


@contextlib.contextmanager
def _ray(tree: Path | None):
    """A local Ray for one row, whose processes import scalelab from `tree` (None: as installed)."""
    import ray

    saved = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(tree / "platform"), *([saved] if saved else [])])
    try:
        ray.init(num_cpus=2, object_store_memory=400_000_000, include_dashboard=False)
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _row(world: Path, root: Path, preset: str, batch: int, n_trials: int, label: str, poll: str, args):
    import ray

    storage = root / f"{preset}-b{batch}-t{n_trials}-p{poll}"
    env = {**os.environ, POLL_ENV: poll, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    procs, names = [], []
    for i in range(n_trials):
        name = f"loop{i}"
        config = storage / name / f"{name}.yaml"  # a storage (and MLflow store) per run
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(_experiment(world, config.parent, name, preset, batch, args)))
        log = (config.parent / f"{name}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-m", "scalelab.cli", "train", str(config)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
        names.append(name)
    for proc in procs:
        if proc.wait() != 0:
            log_text = "".join(p.read_text()[-3000:] for p in storage.glob("*/*.log"))
            raise SystemExit(f"a run of {storage} failed:\n{log_text}")
    measured = [_measure(f"sqlite:///{storage / n / 'mlflow.db'}", n) for n in names]
    wall, inside = max(measured, key=lambda m: m[0] / m[1])
    return {"preset": preset, "batch": batch, "trials": n_trials, "poll": label, "wall": wall,
            "inside": inside, "ratio": wall / inside}


def _format(r: dict) -> str:
    return (f"| {r['code']} | {r['preset']} | {r['batch']} | {r['trials']} | {r['poll']} | {r['wall']:.4f} | "
            f"{r['inside']:.4f} | {r['ratio']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["nano", "micro"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--trials", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="nano, batch 64, one trial")
    parser.add_argument("--polls", nargs="+", choices=sorted(POLLS), default=list(POLLS),
                        help="worker poll intervals to run (default: both)")
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=ROOT",
                        help="a scalelab source tree to run every row with (repeatable; default: installed)")
    args = parser.parse_args()
    args.code = [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in args.code] or [
        ("installed", None)]
    if args.quick:
        args.presets, args.batches, args.trials = ["nano"], [64], [1]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scalelab-loop-") as tmp:
        root = Path(tmp)
        world = _world(root)
        # A local Ray per row; each run is its own `scalelab train` process attached to it.
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        print(f"log_every {args.log_every}, {args.steps} steps per run\n")
        print("| code | preset | batch | trials | worker poll | wall s/step | in-step s | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        _run_rows(world, root, args.presets, args.batches, args.trials, args)
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
