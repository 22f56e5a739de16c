"""Fixed cost of a run: the wall time of a `scalelab train` beyond its steps, phase by phase.

    python benchmarks/startup.py                      # the demo's presets on 1000 and 8000 pairs
    python benchmarks/startup.py --quick              # nano on 1000 pairs
    python benchmarks/startup.py --code before=/path/to/old/checkout --code now=.   # side by side
    python benchmarks/startup.py --sweep --code before=/path/to/old/checkout --code now=.

What is measured, per row: one real `scalelab train` command (its own local Ray, a Ray Train worker,
DeepSpeed ZeRO-2, MLflow on sqlite, the demo's cached data and its final evaluation) of the demo sweep's
trial setup, `--steps` steps, started as a subprocess with `SCALELAB_TIMELINE` set: the driver and
rank 0 mark each phase (train/timeline.py), the table gives the seconds between marks.

- `cli`: process start → `launch` (Python, scalelab's imports, the config); `mlflow`: preflight and
  the MLflow run; `ray`: the local Ray instance (`ensure_ray`); once per command, not per sweep trial.
- `group`: Ray Train's controller and worker group until the worker enters scalelab's loop (actor
  processes, their imports, the process group); `engine`: model + DeepSpeed engine (timm, DeepSpeed
  imports included); `data`: the reporter and the data stream (decoding the cached subset).
- `warm-up`: the first 10 steps beyond 10 steady steps; `steady s/step`: the median step interval over
  the rest; `end`: the final evaluation, checkpoint and report; `exit`: `fit()` returning, the summary,
  Ray's shutdown and the process exit.
- Trials of a sweep share their storage, and with it the decoded subsets (data/subset_cache.py): so do
  the rows here (one storage per tree, data size and round), so the first preset of each data size
  decodes and the later ones load it, as the trials of a sweep do.
- `fixed` = total − steps × steady s/step; `per trial` = fixed − cli − ray − exit, what a sweep trial
  pays (a sweep starts Python and Ray once). The final evaluation is inside `end`, also shown alone.

`--sweep`: the same phases per trial of a sequential sweep (`scalelab sweep`, one trial at a time,
the demo's base config on 1000 pairs, one trial per preset and batch 32 / 64), which is what the demo's
trials pay: `gap` is the time from the previous trial's end (the sweep's start for the first) to this
trial's `launch` in its Tune trial actor, `mlflow` the trial's preflight and MLflow run, `exit` from its
last checkpoint to `launch` returning, `fixed` = gap + the trial's time − steps × steady s/step. The
first trial also carries the sweep's one-time start (Python, Ray, the first trial actor): the last row,
`later`, is the median of the others.

`--code LABEL=ROOT` (repeatable) runs every row once per source tree (`ROOT/platform` first on
PYTHONPATH of the command and so of the Ray it starts); rows of different trees alternate, so machine
noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = (("cli", "cmd_start", "launch"), ("mlflow", "launch", "mlflow_run"), ("ray", "mlflow_run", "ray"),
          ("group", "ray", "worker_entered"), ("engine", "worker_entered", "engine_built"),
          ("data", "engine_built", "stream_ready"))
WARMUP = 10


def _world(args: argparse.Namespace, scratch: Path) -> Path:
    if args.world:
        return Path(args.world).resolve()
    demo = REPO / "runs" / "data" / "demo-easy"
    if (demo / "manifest.json").exists():
        return demo
    from scalelab.data.synth import generate_world
    from scalelab.data.tokenizer import train_tokenizer

    out = scratch / "world"
    generate_world(out, n_pairs=max(args.pairs), seed=0, image_size=32, progress=False, eval_per_class=20,
                   retrieval_pairs=500, level="easy")
    train_tokenizer(out, vocab_size=1000, kind="bpe")
    return out


def _command(world: Path, storage: Path, preset: str, pairs: int, args: argparse.Namespace) -> list[str]:
    sets = {name: world / "eval" / name for name in ("test", "v2", "sketch", "texture")}
    overrides = {
        "name": f"startup-{preset}", "model.preset": preset, "data.sources": f"[{{path: {world}}}]",
        "data.n_pairs": pairs, "train.global_batch": args.batch,
        "train.micro_batch_size": min(args.batch, 64),
        "train.steps": args.steps, "train.cpus_per_worker": 0.75, "run.storage": storage,
        "run.log_every": 50, "run.checkpoint_every": "null", "eval.every_steps": "null",
        "eval.retrieval": world / "eval" / "retrieval",
        "eval.sets": "{" + ", ".join(f"{k}: {v}" for k, v in sets.items()) + "}",
    }
    cmd = [sys.executable, "-m", "scalelab.cli", "train", str(REPO / "experiments" / "demo.yaml"),
           "--ray", "local"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def _timed(code: Path, cmd: list[str], scratch: Path) -> tuple[list[dict], float, float]:
    """Run `cmd` with `code`'s sources and the timeline on: its marks, start and end time."""
    timeline = scratch / "timeline.jsonl"
    timeline.unlink(missing_ok=True)
    env = {**os.environ, "SCALELAB_TIMELINE": str(timeline), "PYTHONPATH": str(code / "platform"),
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu"}
    start = time.time()
    done = subprocess.run(cmd, env=env, cwd=scratch, capture_output=True, text=True)
    end = time.time()
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in timeline.read_text().splitlines()], start, end


def _run(code: Path, cmd: list[str], scratch: Path) -> dict[str, float]:
    return _phases(*_timed(code, cmd, scratch))


def _phases(events: list[dict], start: float, end: float) -> dict[str, float]:
    first = {"cmd_start": start, "cmd_end": end}
    for e in events:
        first.setdefault(e["event"], e["t"])
    steps = sorted((e["step"], e["t"]) for e in events if e["event"] == "step")
    times = [t for _, t in steps]
    steady = statistics.median(b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1:], strict=False))
    out = {name: first[b] - first[a] for name, a, b in PHASES}
    out["warm-up"] = (times[WARMUP - 1] - first["stream_ready"]) - WARMUP * steady
    out["steady s/step"] = steady
    out["end"] = first["checkpoint_reported"] - times[-1]
    out["exit"] = end - first["checkpoint_reported"]
    out["total"] = end - start
    out["fixed"] = out["total"] - len(times) * steady
    out["per trial"] = out["fixed"] - out["cli"] - out["ray"] - out["exit"]
    return out


SWEEP_PHASES = (("mlflow", "launch", "ray"), ("group", "ray", "worker_entered"),
                ("engine", "worker_entered", "engine_built"), ("data", "engine_built", "stream_ready"),
                ("exit", "checkpoint_reported", "launch_returned"))
SWEEP_COLUMNS = ("cycle", "fixed", "gap", "mlflow", "group", "engine", "data", "warm-up", "end", "exit",
                 "steady s/step")


def _sweep_yaml(world: Path, storage: Path, presets: list[str], args: argparse.Namespace) -> Path:
    """A sequential sweep over `presets` (one trial each) with the demo's base config and trial setup."""
    sets = ", ".join(f"{k}: {world / 'eval' / k}" for k in ("test", "v2", "sketch", "texture"))
    text = f"""name: startup
base: {REPO / "experiments" / "demo.yaml"}
overrides:
  data: {{sources: [{{path: {world}}}]}}
  eval: {{every_steps: null, sets: {{{sets}}}, retrieval: {world / "eval" / "retrieval"}}}
  run: {{log_every: 50, checkpoint_every: null}}
axes:
  data: [1000]
  model: [{", ".join(dict.fromkeys(presets))}]
  batch: [32, 64]
budget: {{kind: steps, value: {args.steps}}}
micro_batch: {{size: 64}}
resources: {{workers_per_trial: 1, cpus_per_worker: 0.75, max_concurrent_trials: 1}}
storage: {storage}
metric: eval/zeroshot/test/top1
"""
    path = storage.with_suffix(".yaml")
    path.write_text(text)
    return path


def _sweep_trials(events: list[dict], start: float, end: float) -> list[dict[str, float]]:
    """Per trial of a sequential sweep: its phases, from the trial actor's and rank 0's marks."""
    trials: list[list[dict]] = []
    for e in events:
        if e["event"] == "launch":
            trials.append([])
        if trials:
            trials[-1].append(e)
    rows, previous_end = [], start
    for marks in trials:
        first: dict[str, float] = {}
        for e in marks:
            first.setdefault(e["event"], e["t"])
        times = [e["t"] for e in marks if e["event"] == "step"]
        steady = statistics.median(b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1:], strict=False))
        row = {name: first[b] - first[a] for name, a, b in SWEEP_PHASES}
        row["gap"] = first["launch"] - previous_end
        row["warm-up"] = (times[WARMUP - 1] - first["stream_ready"]) - WARMUP * steady
        row["end"] = first["checkpoint_reported"] - times[-1]
        row["steady s/step"] = steady
        row["cycle"] = first["launch_returned"] - previous_end
        row["fixed"] = row["cycle"] - len(times) * steady
        rows.append(row)
        previous_end = first["launch_returned"]
    return rows


def _sweep_main(args: argparse.Namespace, codes: list[tuple[str, Path]]) -> None:
    presets = args.presets.split(",")
    rows: dict[str, list[list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        scratch = Path(tmp)
        world = _world(args, scratch)
        for round_ in range(args.rounds):
            for label, code in codes:  # alternating trees: noise hits both alike
                config = _sweep_yaml(world, scratch / f"sweep-{label}-{round_}", presets, args)
                cmd = [sys.executable, "-m", "scalelab.cli", "sweep", str(config)]
                trials = _sweep_trials(*_timed(code, cmd, scratch))
                rows.setdefault(label, []).append(trials)
                for i, t in enumerate(trials):
                    shown = " ".join(f"{k} {v:.2f}" for k, v in t.items())
                    print(f"# {label} round {round_} trial {i}: {shown}", flush=True)
    print(f"\nseconds per trial of a sequential sweep; batch 32 and 64, {args.steps} steps, "
          f"{args.rounds} round(s), median over rounds\n")
    print("| code | trial | " + " | ".join(SWEEP_COLUMNS) + " |")
    print("|" + "---|" * (len(SWEEP_COLUMNS) + 2))
    for label, rounds in rows.items():
        n = min(len(r) for r in rounds)
        per_index = [[r[i] for r in rounds] for i in range(n)]
        later = [t for r in rounds for t in r[1:n]]
        for name, group in [*((str(i), g) for i, g in enumerate(per_index)), ("later", later)]:
            cells = [statistics.median(t[c] for t in group) for c in SWEEP_COLUMNS]
            shown = [f"{v:.3f}" if c == "steady s/step" else f"{v:.1f}"
                     for c, v in zip(SWEEP_COLUMNS, cells, strict=True)]
            print(f"| {label} | {name} | " + " | ".join(shown) + " |")


COLUMNS = ("total", "fixed", "per trial", "cli", "mlflow", "ray", "group", "engine", "data", "warm-up",
           "end", "exit", "steady s/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="pico,nano,micro")
    parser.add_argument("--pairs", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 8000])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--world", default=None,
                        help="world folder (default: runs/data/demo-easy if present)")
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=ROOT")
    parser.add_argument("--quick", action="store_true", help="nano on 1000 pairs, one round")
    parser.add_argument("--sweep", action="store_true", help="per trial of a sequential sweep of --presets")
    args = parser.parse_args()
    if args.quick:
        args.presets, args.pairs, args.rounds = "nano", [1000], 1
    codes = [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in args.code] or [("now", REPO)]
    if args.sweep:
        _sweep_main(args, codes)
        return
    rows: dict[tuple, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        scratch = Path(tmp)
        world = _world(args, scratch)
        for round_ in range(args.rounds):
            for pairs in args.pairs:
                for preset in args.presets.split(","):
                    for label, code in codes:  # alternating trees: noise hits both alike
                        # one storage per tree, data size and round, as a sweep's trials share theirs:
                        # the first preset of a data size decodes it, the next find it on disk
                        storage = scratch / f"runs-{label}-{pairs}-{round_}"
                        result = _run(code, _command(world, storage, preset, pairs, args), scratch)
                        rows.setdefault((label, preset, pairs), []).append(result)
                        shown = " ".join(f"{k} {v:.2f}" for k, v in result.items())
                        print(f"# {label} {preset} {pairs}: {shown}", flush=True)
    print(f"\nseconds; batch {args.batch}, {args.steps} steps, {args.rounds} round(s), median over rounds\n")
    print("| code | preset | pairs | " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    for (label, preset, pairs), results in rows.items():
        cells = [statistics.median(r[c] for r in results) for c in COLUMNS]
        shown = [f"{v:.3f}" if c == "steady s/step" else f"{v:.1f}"
                 for c, v in zip(COLUMNS, cells, strict=True)]
        print(f"| {label} | {preset} | {pairs} | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main()
