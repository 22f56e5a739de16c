"""Checkpoint layout and the state that makes a resumed run continue exactly where it stopped.

One checkpoint is one folder (Ray Train merges every rank's files into it on storage):

    <run.storage>/<name>/step_00000120/       (run.storage: a local folder or a URI, see storage.py)
        scalelab.json         RunState: step, samples_seen, world size, MLflow run id, config, final eval
        rank_<r>.pt           RankState of rank r: epoch, position in the epoch, skipped counts, RNG
        deepspeed/state/...   engine.save_checkpoint: module, optimizer (ZeRO partitions per rank)
        deepspeed/latest

The data position is per rank: bad rows are dropped where they are read, so after the same number of
steps two ranks may have consumed different numbers of rows of their epoch shares. Restoring
`(epoch, epoch_samples)` per rank (the pipeline's `start_sample`) and each rank's RNG state makes the
continued run identical to an uninterrupted one (tests/train/test_launch.py checks the parameters).

ZeRO partitions are tied to the world size; `read_run_state` lets the driver refuse a resume on a
different number of workers before any work starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from scalelab import storage
from scalelab.storage import Location

__all__ = [
    "DS_SUBDIR",
    "DS_TAG",
    "META_NAME",
    "RankState",
    "RunState",
    "checkpoint_name",
    "latest_checkpoint",
    "load_checkpoint",
    "read_run_state",
    "save_checkpoint",
    "world_size_error",
]

META_NAME = "scalelab.json"
DS_SUBDIR = "deepspeed"
DS_TAG = "state"  # fixed tag: one DeepSpeed state per checkpoint folder
FORMAT = 1
_NAME = re.compile(r"^step_(\d{8,})$")


@dataclass
class RunState:
    """What every rank agrees on; rank 0 writes it as JSON (readable without torch or DeepSpeed)."""

    step: int = 0
    samples_seen: int = 0
    world_size: int = 1
    mlflow_run_id: str | None = None
    finished: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)  # NonFiniteGuard state: total, consecutive
    format: int = FORMAT

    def advance(self, samples: int) -> None:
        """One optimizer step of `samples` pairs (the global batch) taken."""
        self.step += 1
        self.samples_seen += samples


@dataclass
class RankState:
    """One rank's data position and randomness."""

    epoch: int = 0
    epoch_samples: int = 0  # valid samples of this rank's epoch share consumed (the resume point)
    skipped: dict[str, int] = field(default_factory=dict)  # bad rows by reason, whole run
    torch_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None


def checkpoint_name(step: int) -> str:
    """Deterministic folder name of the checkpoint after `step` optimizer steps (sorts by step)."""
    return f"step_{step:08d}"


def save_checkpoint(
    engine: Any, directory: str | Path, run: RunState, rank_state: RankState, rank: int
) -> None:
    """Write this rank's share of a checkpoint into `directory` (a local folder per rank).

    Collective: every rank must call it (ZeRO's save gathers and writes per-rank partitions).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory / DS_SUBDIR), tag=DS_TAG)
    torch.save(asdict(rank_state), directory / f"rank_{rank}.pt")
    if rank == 0:
        (directory / META_NAME).write_text(json.dumps(asdict(run), indent=1, sort_keys=True))


def load_checkpoint(
    engine: Any, directory: str | Path, rank: int, world_size: int
) -> tuple[RunState, RankState]:
    """Restore the engine (module + optimizer) and return the run's and this rank's state.

    Collective. Raises ValueError when the checkpoint was written by a different number of workers
    (ZeRO partitions do not match); the driver normally refuses this before starting.
    """
    directory = Path(directory)
    run = read_run_state(directory)
    if run.world_size != world_size:
        raise ValueError(world_size_error(directory, run.world_size, world_size))
    path, _ = engine.load_checkpoint(
        str(directory / DS_SUBDIR), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {directory / DS_SUBDIR}")
    raw = torch.load(directory / f"rank_{rank}.pt", weights_only=False)
    return run, RankState(**raw)


def read_run_state(directory: Location) -> RunState:
    """The RunState of a checkpoint folder (local or on a storage URI); a clear error when it is not
    a scalelab checkpoint."""
    meta = storage.join(directory, META_NAME)
    if not storage.is_file(meta):
        raise FileNotFoundError(
            f"{storage.describe(directory)} is not a scalelab checkpoint (no {META_NAME})")
    data = json.loads(storage.read_text(meta))
    if data.get("format") != FORMAT:
        raise ValueError(f"{storage.describe(meta)}: checkpoint format {data.get('format')!r}, "
                         f"this scalelab reads {FORMAT}")
    return RunState(**data)


def latest_checkpoint(run_dir: Location) -> Location | None:
    """The newest complete checkpoint folder of a run (by step), or None; a Path for a local run
    folder, a URI for one on a storage URI (`storage.py`)."""
    found = sorted(((int(m.group(1)), entry) for entry in storage.list_dir(run_dir)
                    if (m := _NAME.match(entry))), reverse=True)
    for _, entry in found:  # newest first: usually the first one is complete
        if _complete(storage.join(run_dir, entry)):
            return storage.join(run_dir, entry)
    return None


def _complete(directory: Location) -> bool:
    """Every rank's share arrived: the metadata, each rank's state file and DeepSpeed's `latest` tag
    (a driver killed while Ray was copying the ranks' files leaves an incomplete folder). One listing
    of the folder answers it, on an object store too."""
    files = storage.list_files(directory)
    if META_NAME not in files or f"{DS_SUBDIR}/latest" not in files:
        return False
    try:
        world = read_run_state(directory).world_size
    except (FileNotFoundError, ValueError, TypeError):
        return False
    return all(f"rank_{r}.pt" in files for r in range(world))


def world_size_error(directory: Location, saved: int, now: int) -> str:
    """The message for a resume on a different number of workers (driver and worker share it)."""
    return (
        f"checkpoint {storage.describe(directory)} was written by {saved} workers but this run has "
        f"train.num_workers={now}: "
        f"ZeRO partitions the optimizer state by worker count. Resume with train.num_workers={saved}, "
        "or start a new run under another name (optionally from `scalelab export`ed weights)."
    )
