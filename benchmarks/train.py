"""Training-step throughput: Ray Train workers x DeepSpeed ZeRO stage x cached / single-micro-batch step.

    python benchmarks/train.py                     # tiny + small, 1 and 2 workers, ZeRO 0/2/3 (~9 min alone)
    python benchmarks/train.py --quick             # tiny only, one round, 3 timed steps (~2 min)
    python benchmarks/train.py --presets tiny --steps 8 --batch 256 --micro 64

What is measured: samples/s of `scalelab.train.step.train_step` (lr → gradient cache through
`engine.backward` → `engine.step()` → temperature clamp), driven inside Ray Train workers
(`TorchTrainer`, gloo, `DS_ACCELERATOR=cpu`), on synthetic random tensors already in memory, so the
data pipeline is not part of it (`benchmarks/data.py` measures that). fp32, a fixed global batch.
Every row is measured in `--rounds` passes over all rows (a fresh model and engine each time, one
warm-up step after each build, then `--steps` timed steps, each starting after a barrier so a step
is timed from the moment every rank has entered it); the table gives the median of all timed steps
of a row, its fastest single step (the least disturbed by other load on a shared machine), and
`round spread` = slowest / fastest round median of that row, a noise indicator (1.00 = the rounds
agree).

The two step kinds use the same engine and the same `train_step`; only the micro-batch differs:
- `cached`: micro-batch `--micro` (several micro-batches per rank: the gradient cache proper, with
  one DeepSpeed accumulation micro-step per micro-batch and the boundary on the last one);
- `1 mb`: micro-batch = the per-rank batch, i.e. one micro-batch per rank, which is what "no cache"
  means for this trainer. It is *not* a plain autograd step: `cached_step` still runs its no-grad
  first pass over the single micro-batch, so both kinds cost 2 forwards + 1 backward per sample.
  The ratio between them is therefore the cost of *splitting* (more, smaller kernels, more
  `engine.backward` calls and ZeRO accumulation bookkeeping), not the ≈ 4/3 of the extra forward,
  which `benchmarks/gradcache.py time` measures against a genuinely plain step. A plain step that
  is also a correct *global* contrastive step under data parallelism would need the embeddings
  all-gathered with autograd; a per-rank local loss + `engine.backward` is a different (smaller-batch)
  objective and would not be a fair baseline.

Workers: `1` = one Ray Train worker owning all CPU threads; `2` = two workers (two DeepSpeed ranks,
global batch split in half) with the threads divided between them, so every row uses the same
cores. On a 2-core machine two workers therefore do not add hardware: they add all-gathers,
gradient all-reduces and a second Python process competing for the same two cores.

`loop wall / in-step` (on the 1-worker ZeRO-2 cached row of each preset, the demo's setup; `--no-loop`
skips it): the same preset trained for real by `scalelab train` (the worker loop with data, logging
every 10 steps to MLflow and the live view, checkpoint at the end), its wall time per step over the
time inside `train_step`, measured as benchmarks/loop.py does (1.00 = the loop adds nothing).

Each worker count is one `TorchTrainer.fit()`; inside it, each (preset, ZeRO stage, step kind)
builds a fresh model and DeepSpeed engine in the same processes. Output: one markdown table, the
ratio column relative to the 1-worker ZeRO-0 cached row of the same preset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ZERO_STAGES = (0, 2, 3)
LOOP_ROW = (1, 2, "cached")  # (workers, zero, step): the row the loop ratio belongs to (the demo's setup)
LOOP_STEPS = 200
KINDS = ("cached", "1 mb")


def _experiment(preset: str, zero: int, micro: int, batch: int, workers: int) -> dict:
    return {
        "name": f"bench-{preset}-z{zero}-w{workers}",
        "model": {"preset": preset},
        "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.1, "warmup_steps": 0},
        "train": {"global_batch": batch, "micro_batch_size": micro, "steps": 1000, "seed": 0,
                  "precision": "fp32", "zero_stage": zero, "num_workers": workers},
    }


def _run_job(job: dict, rank: int, world: int, warmup: int, steps: int) -> list[float]:
    """Build model + engine for one table row, run warm-up and timed steps; step seconds (timed)."""
    import torch

    from scalelab.config import ExperimentConfig, validate
    from scalelab.models import create_model
    from scalelab.train.engine import build_engine, zero_stage
    from scalelab.train.step import train_step

    cfg = validate(ExperimentConfig, job["experiment"])
    torch.manual_seed(cfg.train.seed)  # same initial parameters on every rank
    model = create_model(cfg.model.preset).train()
    spec = model.config
    engine, _ = build_engine(model, cfg, world_size=world)
    assert zero_stage(engine) == cfg.train.zero_stage
    rows = cfg.train.global_batch // world
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own rows of the global batch
    images = torch.randn(rows, 3, spec.image_size, spec.image_size, generator=g)
    tokens = torch.randint(1, spec.vocab_size, (rows, spec.context_length), generator=g)
    tokens[:, spec.context_length * 3 // 4:] = 0  # some padding, as real captions have
    times = []
    for s in range(warmup + steps):
        if world > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        train_step(engine, images, tokens, cfg, step=s)
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    del engine, model
    return times


def _worker(config: dict) -> None:
    """Ray Train worker: run every job of this worker count; rank 0 appends results to a JSON file."""
    import gc

    import ray.train
    import torch

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # A throwaway job first: the first engine in a process pays one-off costs (imports, allocator and
    # thread-pool warm-up, gloo buffers) that would otherwise land on whichever row runs first.
    _run_job(config["jobs"][0], rank, world, 1, 1)
    times: dict[int, list[list[float]]] = {i: [] for i in range(len(config["jobs"]))}
    # Rounds over all rows, so slow phases of a shared machine hit every row rather than one.
    for rnd in range(config["rounds"]):
        for i, job in enumerate(config["jobs"]):
            times[i].append(_run_job(job, rank, world, config["warmup"], config["steps"]))
            gc.collect()
            if rank == 0:
                r = job["row"]
                print(f"[bench] round {rnd} {r['preset']} w={world} zero={r['zero']} {r['kind']}: "
                      + " ".join(f"{t:.3f}" for t in times[i][-1]), flush=True)
    if rank == 0:
        results = []
        for i, job in enumerate(config["jobs"]):
            every = [t for rnd in times[i] for t in rnd]
            rounds = [statistics.median(rnd) for rnd in times[i]]
            results.append({**job["row"], "median_s": statistics.median(every), "times": times[i],
                            "spread": max(rounds) / min(rounds)})
        Path(config["out"]).write_text(json.dumps(results))


def _jobs(presets: list[str], workers: int, batch: int, micro: int) -> list[dict]:
    per_rank = batch // workers
    jobs = []
    for preset in presets:
        for zero in ZERO_STAGES:
            for kind in KINDS:
                mb = micro if kind == "cached" else per_rank
                jobs.append({
                    "experiment": _experiment(preset, zero, mb, batch, workers),
                    "row": {"preset": preset, "workers": workers, "zero": zero, "kind": kind,
                            "micro": mb, "micro_batches": -(-per_rank // mb)},
                })
    return jobs


def _fit(
    workers: int, threads: int, jobs: list[dict], warmup: int, steps: int, rounds: int, storage: str
) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(storage) / f"results-{workers}.json"
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"jobs": jobs, "threads": threads, "warmup": warmup, "steps": steps,
                           "rounds": rounds, "out": str(out)},
        # 0.5 CPU each: Ray's resource accounting only; the thread count decides the actual share.
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=f"bench-train-w{workers}", storage_path=storage,
                             worker_runtime_env={"env_vars": env}),
    )
    trainer.fit()
    return json.loads(out.read_text())


def _table(rows: list[dict], batch: int, threads: dict[int, int], loop: dict[str, float]) -> str:
    base = {r["preset"]: r["median_s"] for r in rows if r["workers"] == 1 and r["zero"] == 0
            and r["kind"] == "cached"}
    lines = ["| preset | workers | threads/worker | zero | step | micro-batches/rank | step s | samples/s "
             "| vs 1w ZeRO-0 cached | fastest step s | round spread | loop wall / in-step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = base[r["preset"]] / r["median_s"] if r["preset"] in base else float("nan")
        in_loop = loop.get(r["preset"]) if (r["workers"], r["zero"], r["kind"]) == LOOP_ROW else None
        lines.append(
            f"| {r['preset']} | {r['workers']} | {threads[r['workers']]} | {r['zero']} | "
            f"{r['kind']} | {r['micro_batches']} x {r['micro']} | {r['median_s']:.3f} | "
            f"{batch / r['median_s']:,.0f} | {ratio:.2f}x | {min(min(t) for t in r['times']):.3f} | "
            f"{r['spread']:.2f} | {'' if in_loop is None else f'{in_loop:.2f}'} |"
        )
    return "\n".join(lines)


def _loop_ratios(presets: list[str], batch: int) -> dict[str, float]:
    """Per preset: wall time per step of a real `scalelab train` run (the training loop, logging every
    10 steps, MLflow, the progress queue) over the time inside the step, as benchmarks/loop.py measures
    it (1 trial, scalelab's worker poll, `LOOP_STEPS` steps, batch `batch`, the demo's micro-batch)."""
    import loop as loop_bench  # benchmarks/loop.py: this script's folder is on sys.path

    args = argparse.Namespace(steps=LOOP_STEPS, log_every=10)
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        root = Path(tmp)
        world = loop_bench._world(root)
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        for preset in presets:
            with loop_bench._ray(None):
                row = loop_bench._row(world, root, preset, batch, 1, "scalelab", loop_bench.POLLS["scalelab"],
                                      args)
            ratios[preset] = row["ratio"]
            print(f"[bench] loop {preset} b{batch}: {row['wall']:.4f} s/step at the wall, "
                  f"{row['inside']:.4f} inside: {row['ratio']:.2f}", flush=True)
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,small", help="comma-separated preset names")
    p.add_argument("--workers", default="1,2", help="comma-separated Ray Train worker counts")
    p.add_argument("--batch", type=int, default=128, help="global contrastive batch")
    p.add_argument("--micro", type=int, default=32, help="micro-batch of the cached step")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after each engine build")
    p.add_argument("--steps", type=int, default=4, help="timed steps per row and round")
    p.add_argument("--rounds", type=int, default=2, help="passes over all rows (median of all timed steps)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="cores shared by all workers")
    p.add_argument("--quick", action="store_true", help="tiny only, 1 round of 1 warm-up + 3 timed steps")
    p.add_argument("--no-loop", dest="loop", action="store_false",
                   help="skip the real-run loop ratio column (one `scalelab train` per preset)")
    args = p.parse_args()
    presets = ["tiny"] if args.quick else args.presets.split(",")
    warmup, steps, rounds = (1, 3, 1) if args.quick else (args.warmup, args.steps, args.rounds)
    worker_counts = [int(w) for w in args.workers.split(",")]

    import ray
    import torch

    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths are length-limited
    storage = tempfile.mkdtemp(prefix="bench-train-")
    print(f"# torch {torch.__version__}, {args.cpus} CPUs; global batch {args.batch}, cached micro-batch "
          f"{args.micro}, fp32, {rounds} round(s) of {warmup} warm-up + {steps} timed steps per row "
          "(median of all timed steps)", flush=True)
    ray.init(num_cpus=args.cpus, object_store_memory=300_000_000, include_dashboard=False, _temp_dir=temp,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    rows, threads = [], {}
    t0 = time.perf_counter()
    try:
        for workers in worker_counts:
            threads[workers] = max(1, args.cpus // workers)
            rows += _fit(workers, threads[workers], _jobs(presets, workers, args.batch, args.micro),
                         warmup, steps, rounds, storage)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)
    rows.sort(key=lambda r: (presets.index(r["preset"]), r["workers"], r["zero"], KINDS.index(r["kind"])))
    loop = _loop_ratios(presets, args.batch) if args.loop and 1 in worker_counts else {}
    print(f"\n## train_step throughput (global batch {args.batch}; total {time.perf_counter() - t0:.0f} s)")
    print(_table(rows, args.batch, threads, loop))


if __name__ == "__main__":
    main()
