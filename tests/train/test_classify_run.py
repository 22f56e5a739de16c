"""`task: classify` end to end on real local Ray (2 workers), DeepSpeed ZeRO-2 on CPU, MLflow on sqlite.

One labelled set of the easy synthetic world (its JFT analogue: `generate_labelled`'s samples, a few
with broken labels) and a held-out split of the same classes (the world's `test` eval set, its own
random stream). Two runs of the same config share the module:
- `steady`, uninterrupted: it learns (top-1 on the held-out split well above the 1/23 of chance),
  logs the stable keys, counts the bad labels, checkpoints, and exports weights whose `image_tower.*`
  load into a DualEncoder of the same preset;
- `failed`: rank 1 raises at step 57, after the step-50 checkpoint; Ray restarts the worker group from
  it (mid-epoch: 15 steps per epoch), and the run ends with bit-identical fp32 parameters and the same
  logged losses as `steady`.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from scalelab.config import ExperimentConfig, validate
from scalelab.train.checkpoint import latest_checkpoint
from scalelab.train.faults import FAIL_AT_STEP_ENV, FAIL_MARKER_ENV, FAIL_RANK_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 150
CLASSES = 23


@pytest.fixture(scope="module")
def labelled_world(tmp_path_factory):
    """1024 labelled samples (every 50th label out of range, every 70th json without one) + the split."""
    from scalelab.data.shards import ShardWriter
    from scalelab.data.synth import generate_eval_sets, label_spaces, make_labelled

    root = tmp_path_factory.mktemp("labelled")
    with ShardWriter(root / "train", samples_per_shard=256, source="test",
                     extra={"label_names": label_spaces()}) as writer:
        for i in range(1024):
            key, image, caption, meta = make_labelled(0, i, level="easy")
            if i % 50 == 49:
                meta["label"] = 99
            elif i % 70 == 69:
                del meta["label"]
            writer.write(key, image, caption, meta)
        writer.finish()
    generate_eval_sets(root / "eval", sets=["test"], per_class=6, level="easy")
    return root


def _config(world, storage, name: str) -> ExperimentConfig:
    return validate(ExperimentConfig, {
        "name": name, "task": "classify", "model": {"preset": "tiny"},
        "data": {"sources": [{"path": str(world / "train")}], "labels": {"field": "label"},
                 "augment": False, "decode_batch_size": 128, "decode_cpus": 0.25},
        "optim": {"lr": 3e-3, "weight_decay": 0.05, "warmup_steps": 10},
        "train": {"global_batch": 64, "micro_batch_size": 16, "steps": STEPS, "zero_stage": 2,
                  "num_workers": 2, "cpus_per_worker": 0.5},
        "classify": {"head": "softmax", "eval_sets": {"test": str(world / "eval" / "test")}},
        "eval": {"every_steps": 100},
        "run": {"storage": str(storage), "log_every": 5, "checkpoint_every": 50, "keep_checkpoints": 2},
    })


@pytest.fixture(scope="module")
def steady(labelled_world, tmp_path_factory, local_ray):
    from scalelab.train.launch import launch

    cfg = _config(labelled_world, tmp_path_factory.mktemp("steady"), "cls-steady")
    return cfg, launch(cfg, verbose=False)


@pytest.fixture(scope="module")
def failed(labelled_world, tmp_path_factory, local_ray):
    from scalelab.train.launch import launch

    storage = tmp_path_factory.mktemp("failed")
    env = {FAIL_AT_STEP_ENV: "57", FAIL_RANK_ENV: "1", FAIL_MARKER_ENV: str(storage / "failed-once")}
    os.environ.update(env)  # launch.worker_env passes them to the workers
    try:
        result = launch(_config(labelled_world, storage, "cls-failed"), verbose=False)
    finally:
        for key in env:
            os.environ.pop(key)
    assert (storage / "failed-once").read_text() == "57"  # the failure really happened
    return result


def _history(result, key: str) -> list[tuple[int, float]]:
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, key))


def _fp32(result) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(latest_checkpoint(result.run_dir) / "deepspeed"),
                                                    tag="state")


def test_classify_run_learns_logs_stable_keys_and_counts_bad_labels(steady):
    _, result = steady
    assert (result.step, result.samples_seen) == (STEPS, STEPS * 64)
    top1 = _history(result, "eval/classify/test/top1")
    assert [s for s, _ in top1] == [100, STEPS]
    chance = 1 / CLASSES
    print(f"held-out top-1 after {STEPS} steps: {top1[-1][1]:.3f} (chance {chance:.3f})")
    # Learnt, not lucky: the two evaluations pooled (2 x 6 images per class) beat chance by 4 binomial
    # standard deviations, which a model at chance does with probability < 1e-4. (The last one alone
    # is 0.09-0.13 depending on the CPU's rounding: 13 to 18 of 138 images, too few for a firm bound.)
    n = 2 * 6 * CLASSES
    pooled = (top1[0][1] + top1[1][1]) / 2
    assert pooled > chance + 4 * math.sqrt(chance * (1 - chance) / n), top1
    assert result.final_metrics["eval/classify/test/top1"] == pytest.approx(top1[-1][1])
    loss = _history(result, "train/loss")
    assert len(loss) == STEPS // 5 and loss[-1][1] < math.log(CLASSES) - 0.2, loss[-5:]
    assert _history(result, "train/accuracy") and _history(result, "eval/classify/test/top5")
    # 1024 samples: 20 with a label out of range, 13 without one; each epoch reads each once.
    assert _history(result, "data/skipped/bad_label")[-1][1] >= 20
    assert _history(result, "data/skipped/missing_label")[-1][1] >= 13
    import mlflow

    params = mlflow.MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.params
    assert params["task"] == "classify" and params["data.labels.num_classes"] == str(CLASSES)
    macs = int(params["model.macs_per_sample"])  # image tower + head: the text tower is not trained
    assert _history(result, "train/executed_macs")[-1][1] == pytest.approx(3 * macs * STEPS * 64, rel=1e-6)


def test_resumed_after_a_worker_failure_equals_the_uninterrupted_run(steady, failed):
    _, reference = steady
    a, b = _fp32(failed), _fp32(reference)
    assert a.keys() == b.keys() and any(k.startswith("head.") for k in a)
    differ = [k for k in b if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} parameters differ, e.g. {differ[:3]}"
    assert _history(failed, "train/loss") == _history(reference, "train/loss")  # every step once, equal


def test_export_image_tower_loads_into_a_dual_encoder(steady, tmp_path):
    from scalelab.models import create_model
    from scalelab.train.export import export_checkpoint

    cfg, result = steady
    out = export_checkpoint(latest_checkpoint(result.run_dir), tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    assert (meta["task"], meta["num_classes"], meta["head"]) == ("classify", CLASSES, "softmax")
    state = torch.load(out / "model.pt", weights_only=True)
    tower = {k: v for k, v in state.items() if k.startswith("image_tower.")}
    dual = create_model(cfg.model.preset)
    assert set(tower) == {k for k in dual.state_dict() if k.startswith("image_tower.")}
    missing, unexpected = dual.load_state_dict(tower, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("image_tower.")]
    torch.testing.assert_close(dual.image_tower.proj.weight, state["image_tower.proj.weight"])
