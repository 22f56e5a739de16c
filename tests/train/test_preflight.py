"""Bad configs are refused before Ray starts: `scalelab train` exits 2 with a message naming the field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from scalelab.config import ConfigError, EvalConfig, ExperimentConfig, validate
from scalelab.train.checkpoint import RunState, checkpoint_name, latest_checkpoint
from scalelab.train.preflight import (
    check_experiment,
    check_resources,
    check_resume,
    run_dir,
    run_reservation,
    starts_local_ray,
)

# In-process `scalelab train` must see what a fresh command sees: no Ray yet (the session's shared one
# is shut for these tests; the next test that needs it starts it again).
pytestmark = pytest.mark.usefixtures("no_ray")


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


@pytest.fixture
def eval_copy(smoke_world, tmp_path):
    """Factory: the smoke world's `test` eval set copied, with `templates` written and classnames.txt
    optionally removed (class names then come from the folder names)."""

    def make(templates: str | None, classnames: bool = True) -> Path:
        out = tmp_path / f"set{len(list(tmp_path.glob('set*')))}"
        shutil.copytree(smoke_world / "eval" / "test", out)
        if templates is None:
            (out / "templates.txt").unlink()
        else:
            (out / "templates.txt").write_text(templates)
        if not classnames:
            (out / "classnames.txt").unlink()
        return out

    return make


def _refused(config: Path, sets: list[str], capsys) -> str:
    """`scalelab train` in this process: exit 2 and one line on stderr naming the problem; no Ray."""
    from scalelab.cli import main

    rc = main(["train", str(config), *[f"--set={s}" for s in sets]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("scalelab: config error: ") and err.count("\n") == 1, err
    assert not ("ray" in sys.modules and sys.modules["ray"].is_initialized())
    return err


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model.preset=nope"], "unknown preset 'nope'"),
        (["train.global_batch=63"], "must be divisible by train.num_workers=2"),
        (["train.zero_stage=5"], "train.zero_stage"),
        (["data.sources=[{path: /nonexistent/shards}]"], "data.sources[0].path"),
        (["data.image_size=64"], "data.image_size=64"),
        (["data.tokenizer=/etc/hostname"], "data.tokenizer: /etc/hostname is not a tokenizer"),
        (["eval.sets={test: /nonexistent/set}"], "eval.sets.test: eval set directory not found"),
        (["eval.retrieval=/nonexistent/pairs"], "eval.retrieval"),
        (["eval.templates=/nonexistent/t.txt"], "eval.templates: no such file"),
        (["train.global_batch=2048", "train.num_workers=2"], "fewer than train.global_batch=2048"),
        (["train.steps=20", "optim.warmup_steps=30"], "optim.warmup_steps=30 must be below train.steps=20"),
        (["train.steps=20", "optim.warmup_steps=20"], "optim.warmup_steps=20 must be below train.steps=20"),
        (["optim.betas=[0.9, 1.5]"], "optim (adamw): Invalid beta parameter"),
        (["optim.name=lion", "optim.betas=[0.9, 1.0]"], "optim (lion): Invalid beta parameter at index 1"),
        # smoke.yaml runs ZeRO-2: DeepSpeed would hand big_vision's Adafactor flat partitions
        (["optim.name=adafactor_bv"], "optim.name=adafactor_bv cannot run with train.zero_stage=2: ZeRO-2 "
         "steps the optimizer on flat 1-D partitions"),
        (["optim.name=adafactor_bv", "train.zero_stage=3", "train.precision=bf16"],
         "optim.name=adafactor_bv cannot run with train.zero_stage=3"),
        (["optim.name=sgd"], "optim.name"),
        (["train.micro_batch_size=0"], "train.micro_batch_size"),
        (["run.storage=/etc/hostname/runs"], "run.storage: /etc/hostname/runs is not writable"),
        (["train.cpus_per_worker=1000"], "× (train.cpus_per_worker=1000.0 + data.decode_cpus=0.25"),
        (["model.image.init=/nonexistent/vit.safetensors"],
         "model.image.init: no such file or directory: /nonexistent/vit.safetensors"),
        (["model.image.unlock_at_step=5"], "model.image.unlock_at_step needs model.image.lock: true"),
    ],
)
def test_bad_config_is_refused_in_one_line_before_ray(smoke_config, tmp_path, capsys, sets, message):
    config = _write(smoke_config(tmp_path / "runs"), tmp_path / "exp.yaml")
    assert message in _refused(config, sets, capsys)
    assert not (tmp_path / "runs" / "smoke").exists()


@pytest.mark.parametrize(
    ("templates", "message"),
    [
        ("a photo of a dog.\n", "has no placeholder; it needs exactly one"),
        ("a {} and a {c}.\n", "has 2 placeholders"),
        ("a {label}.\n", "has the field {label}"),
        (None, "templates.txt not found"),
    ],
)
def test_bad_eval_templates_are_refused_before_training(smoke_config, eval_copy, tmp_path, capsys,
                                                        templates, message):
    config = _write(smoke_config(tmp_path / "runs"), tmp_path / "exp.yaml")
    err = _refused(config, [f"eval.sets={{test: {eval_copy(templates)}}}", "eval.shifted=[]"], capsys)
    assert "eval.sets.test: " in err and message in err


def test_image_weights_that_do_not_fit_are_refused_naming_the_keys(smoke_config, tmp_path, capsys):
    import timm
    import torch

    torch.manual_seed(0)  # a ViT trunk with another patch size: another position table, patch kernel
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=4, embed_dim=32, depth=2, num_heads=2)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    config = _write(smoke_config(tmp_path / "runs"), tmp_path / "exp.yaml")
    err = _refused(config, [f"model.image.init={tmp_path / 'vit.pth'}", "model.image.lock=true"], capsys)
    assert "model.image.init: timm trunk weights do not fit the image tower (vit_tiny_patch16_224, 32 px): " \
           "2 key(s) with another shape: patch_embed.proj.weight (file (32, 3, 4, 4), tower (32, 3, 8, 8))," \
           " pos_embed (file (1, 65, 32), tower (1, 17, 32))" in err


def test_openai_templates_folder_names_and_a_shared_file_pass(smoke_config, eval_copy, tmp_path):
    shared = tmp_path / "shared.txt"
    shared.write_text("a photo of a {}.\n")
    sets = {"openai": str(eval_copy("a photo of a {}.\nitap of a {}.\n", classnames=False)),
            "bench": str(eval_copy("a photo of a {c}.\n")), "shared": str(eval_copy(None))}
    cfg = smoke_config(tmp_path, {"eval": {"sets": sets, "shifted": [], "templates": str(shared)}})
    check_experiment(cfg)
    with pytest.raises(ConfigError, match="eval.sets.shared: .*templates.txt not found"):
        check_experiment(smoke_config(tmp_path, {"eval": {"sets": sets, "shifted": []}}))


def test_an_eval_image_that_is_not_an_image_is_refused(smoke_config, eval_copy, tmp_path):
    evalset = eval_copy("a photo of a {}.\n")
    bad = sorted(evalset.glob("*/*.png"))[3]
    bad.write_bytes(b"<html>404 not found</html>")
    cfg = smoke_config(tmp_path, {"eval": {"sets": {"test": str(evalset)}, "shifted": []}})
    with pytest.raises(ConfigError, match=f"eval.sets.test: {bad} is not a readable image"):
        check_experiment(cfg)


def test_one_bad_config_through_a_fresh_interpreter(smoke_config, tmp_path):
    """The same refusal as a user sees it: a new process, no traceback, Ray never imported-and-started."""
    config = _write(smoke_config(tmp_path / "runs"), tmp_path / "exp.yaml")
    proc = _train_cli(config, "train.steps=20", "optim.warmup_steps=30")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "optim.warmup_steps=30 must be below train.steps=20" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "RAY_NOT_STARTED" in proc.stdout


def test_resources_the_issue_reported_are_refused_with_the_numbers(smoke_config, tmp_path):
    # 1 worker × (1.5 + 1.0 decode) = 2.5 CPUs on a 2-CPU machine: Ray Data's decode task never runs.
    cfg = smoke_config(tmp_path, {"train": {"num_workers": 1, "cpus_per_worker": 1.5},
                                  "data": {"decode_cpus": 1.0}})
    assert run_reservation(cfg) == {"CPU": 2.5, "GPU": 0.0}
    short = check_resources(cfg, {"CPU": 2.0}, "this machine")
    assert len(short) == 1 and "= 2.5 CPUs, but this machine has 2" in short[0]
    assert check_resources(cfg, {"CPU": 4.0}, "x") == []
    gpu = smoke_config(tmp_path, {"train": {"use_gpu": True}})
    assert any("need 2 GPUs, but x has 0" in s for s in check_resources(gpu, {"CPU": 8.0, "GPU": 0.0}, "x"))
    # The committed smoke and demo settings fit 2 CPUs (CI's machine).
    assert check_resources(smoke_config(tmp_path), {"CPU": 2.0}, "x") == []


def test_local_ray_is_predicted_without_starting_it(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert starts_local_ray("local")
    assert not starts_local_ray("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not starts_local_ray(None)


def test_valid_config_passes_the_checks(smoke_config, tmp_path):
    check_experiment(smoke_config(tmp_path))
    assert check_resume(smoke_config(tmp_path)) is None


@pytest.mark.parametrize("overrides", [
    {"optim": {"name": "lion", "lr": 2e-4, "weight_decay": 0.5, "betas": [0.9, 0.99]}},  # any stage
    {"optim": {"name": "lion"}, "train": {"zero_stage": 3, "precision": "bf16"}},
    {"optim": {"name": "adafactor_bv"}, "train": {"zero_stage": 0, "precision": "fp32"}},
    {"optim": {"name": "adafactor_bv"}, "train": {"zero_stage": 0, "precision": "bf16"}},
    {"optim": {"name": "adafactor"}, "train": {"zero_stage": 3, "precision": "bf16"}},  # caveat, not refused
])
def test_each_optimizer_passes_where_it_runs(smoke_config, tmp_path, overrides):
    check_experiment(smoke_config(tmp_path, overrides))


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
    with pytest.raises(ConfigError, match=r"train.cpus_per_worker: 0.5 -> 1.0"):  # thread count: not bitwise
        check_resume(smoke_config(tmp_path, {"train": {"cpus_per_worker": 1.0}}))
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
