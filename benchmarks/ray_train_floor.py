"""The floor of a run's fixed cost under Ray Train: `TorchTrainer.fit` of a train function that does nothing.

    python benchmarks/ray_train_floor.py            # 5 fits in one local Ray (2 CPUs)

Each row is one `fit()` in the same local Ray instance, with scalelab's settings (one worker at 0.75 CPU,
the controller's poll every 0.1 s, no preemption watcher) and a train function that only notes when it
started: `entered` is `fit()` → the function running (the controller actor, the placement group, the
worker actor and its process group, each a new Python process importing Ray Train, the worker also
torch), `total` is `fit()` → returned (the worker group's shutdown included). What a scalelab trial pays
beyond this is its own (imports of timm and DeepSpeed, the engine, data, the final checkpoint).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def _noop(config: dict) -> None:
    Path(config["mark"]).write_text(repr(time.time()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fits", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address="local", num_cpus=2, object_store_memory=1_000_000_000, include_dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        mark = Path(tmp) / "entered"
        for i in range(args.fits):
            start = time.time()
            run = RunConfig(name=f"floor-{i}", storage_path=tmp,
                            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.75})
            TorchTrainer(_noop, train_loop_config={"mark": str(mark)}, run_config=run,
                         scaling_config=scaling).fit()
            rows.append((float(mark.read_text()) - start, time.time() - start))
    ray.shutdown()
    print("| fit | entered s | total s |\n|---|---|---|")
    for i, (entered, total) in enumerate(rows):
        print(f"| {i} | {entered:.2f} | {total:.2f} |")
    later = rows[1:] or rows
    print(f"| median of fits 1.. | {statistics.median(r[0] for r in later):.2f} | "
          f"{statistics.median(r[1] for r in later):.2f} |")


if __name__ == "__main__":
    main()
