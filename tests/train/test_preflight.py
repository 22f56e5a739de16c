"""Bad configs are refused before Ray starts: `scalelab train` exits 2 with a message naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from scalelab.config import ConfigError, EvalConfig, ExperimentConfig, validate
from scalelab.train.checkpoint import RunState, checkpoint_name, latest_checkpoint
from scalelab.train.preflight import check_experiment, check_resume, run_dir


def _write(cfg: ExperimentConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _fake_checkpoint(cfg: ExperimentConfig, step: int, world: int, config: dict | None = None) -> Path:
    d = run_dir(cfg) / checkpoint_name(step)
    d.mkdir(parents=True)
    state = RunState(step=step, samples_seen=step * 64, world_size=world, config=config or cfg.to_dict())
    (d / "scalelab.json").write_text(json.dumps(asdict(state)))
    for r in range(world):
        (d / f"rank_{r}.pt").write_bytes(b"")
    (d / "deepspeed").mkdir()
    (d / "deepspeed" / "latest").write_text("state")
    return d


def _train_cli(config: Path, *sets: str) -> subprocess.CompletedProcess:
    """`scalelab train` in a fresh interpreter, reporting whether Ray was started."""
    code = (
        "import sys; from scalelab.cli import main; rc = main(sys.argv[1:]); "
        "ray = sys.modules.get('ray'); "
        "print('RAY_STARTED' if ray is not None and ray.is_initialized() else 'RAY_NOT_STARTED'); "
        "sys.exit(rc)"
    )
    args = [sys.executable, "-c", code, "train", str(config)] + [f"--set={s}" for s in sets]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model.preset=nope"], "unknown preset 'nope'"),
        (["train.global_batch=63"], "must be divisible by train.num_workers=2"),
        (["train.zero_stage=5"], "train.zero_stage"),
        (["data.sources=[{path: /nonexistent/shards}]"], "data.sources[0].path"),
        (["data.image_size=64"], "data.image_size=64"),
        (["eval.sets={test: /nonexistent/set}"], "eval.sets.test"),
        (["train.global_batch=2048", "train.num_workers=2"], "fewer than train.global_batch=2048"),
    ],
)
def test_bad_config_fails_before_ray_starts(smoke_config, tmp_path, sets, message):
    config = _write(smoke_config(tmp_path / "runs"), tmp_path / "exp.yaml")
    proc = _train_cli(config, *sets)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "RAY_NOT_STARTED" in proc.stdout
    assert not (tmp_path / "runs" / "smoke").exists()


def test_valid_config_passes_the_checks(smoke_config, tmp_path):
    check_experiment(smoke_config(tmp_path))
    assert check_resume(smoke_config(tmp_path)) is None


def test_resume_on_another_worker_count_is_refused(smoke_config, tmp_path):
    cfg = smoke_config(tmp_path)
    _fake_checkpoint(cfg, 10, world=2)
    one = smoke_config(tmp_path, {"train": {"num_workers": 1}})
    with pytest.raises(ConfigError, match=r"written by 2 workers but this run has train.num_workers=1"):
        check_resume(one)
    assert check_resume(cfg).step == 10


def test_resume_with_changed_training_config_is_refused_but_allowed_changes_pass(smoke_config, tmp_path):
    cfg = smoke_config(tmp_path)
    _fake_checkpoint(cfg, 10, world=2)
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.002"):
        check_resume(smoke_config(tmp_path, {"optim": {"lr": 2e-3}}))
    longer = smoke_config(tmp_path, {"train": {"steps": 60}, "run": {"log_every": 1}})
    assert check_resume(longer.model_copy(update={"eval": EvalConfig()})).step == 10


def test_latest_checkpoint_picks_the_highest_complete_step(smoke_config, tmp_path):
    cfg = smoke_config(tmp_path)
    _fake_checkpoint(cfg, 9, world=2)
    _fake_checkpoint(cfg, 12, world=2)
    (run_dir(cfg) / checkpoint_name(20)).mkdir()  # incomplete: no scalelab.json
    partial = _fake_checkpoint(cfg, 16, world=2)
    (partial / "rank_1.pt").unlink()  # killed while Ray was copying rank 1's share
    assert latest_checkpoint(run_dir(cfg)).name == "step_00000012"


def test_run_names_that_are_not_folder_names_are_refused():
    with pytest.raises(ConfigError, match="name"):
        validate(ExperimentConfig, {"name": "../escape"})
