"""scalelab.tracking against a real MLflow sqlite store in tmp_path (no server)."""

import math
import pickle
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow

from scalelab import tracking
from scalelab.config import flatten


@pytest.fixture
def store(tmp_path):
    """(tracking_uri, experiment_id, client) for a fresh sqlite store under tmp_path."""
    uri = tracking.default_tracking_uri(tmp_path)
    artifacts = tracking.default_artifact_root(uri, tmp_path)
    exp_id = tracking.get_or_create_experiment("exp", uri, artifacts)
    return uri, exp_id, mlflow.MlflowClient(tracking_uri=uri)


def _artifact_paths(client, run_id, path=None):
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return sorted(out)


def test_run_logs_params_metrics_and_artifacts(store, tmp_path):
    uri, exp_id, client = store
    config = {"model": {"preset": "tiny", "embed_dim": 64}, "train": {"batch": 256, "lr": 1e-3},
              "sweep": {"axes": [1, 2]}}
    handle = tracking.start_or_resume_run(uri, exp_id, run_name="r1", tags=tracking.code_version())
    assert handle.log_params(flatten(config)) == []
    for step, loss in [(0, 2.0), (10, 1.5), (20, float("nan"))]:
        handle.log_metrics({"train/loss": loss, "train/samples_seen": step * 4.0, "eval/top1": None}, step)
    handle.log_text("model: tiny\n", "config/resolved.yaml")
    handle.log_dict({"a": 1}, "config/extra.json")
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    handle.log_figure(fig, "plots/loss.png")
    plt.close(fig)
    handle.finish()

    run = client.get_run(handle.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    assert run.data.params["model.embed_dim"] == "64"
    assert run.data.params["sweep.axes"] == "[1, 2]"
    assert "scalelab.version" in run.data.tags
    assert run.data.tags[tracking.RUN_KEY_TAG] == "r1"
    history = client.get_metric_history(handle.run_id, "train/loss")
    assert [m.step for m in history] == [0, 10, 20]
    assert [m.value for m in history][:2] == [2.0, 1.5] and math.isnan(history[2].value)
    assert "eval/top1" not in run.data.metrics  # None dropped
    assert _artifact_paths(client, handle.run_id) == [
        "config/extra.json", "config/resolved.yaml", "plots/loss.png"]
    # Artifacts stay under the storage root.
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "mlartifacts")


def test_resume_continues_the_same_run(store):
    uri, exp_id, client = store
    first = tracking.start_or_resume_run(uri, exp_id, run_name="trial-1",
                                         resume_tag=("trial_id", "abc"))
    first.log_params({"lr": 0.1})
    first.log_metrics({"train/loss": 3.0}, step=1)
    first.finish("FAILED")

    again = tracking.start_or_resume_run(uri, exp_id, run_name="trial-1",
                                         resume_tag=("trial_id", "abc"), tags={"attempt": "2"})
    assert again.run_id == first.run_id
    assert client.get_run(again.run_id).info.status == "RUNNING"
    assert again.log_params({"lr": 0.1}) == []  # same value re-logged on resume: fine
    with pytest.raises(ValueError, match="lr"):
        again.log_params({"lr": 0.2})
    again.log_metrics({"train/loss": 2.0}, step=2)
    history = client.get_metric_history(again.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0)]
    assert len(client.search_runs([exp_id])) == 1
    assert tracking.find_run_by_tag(uri, exp_id, "trial_id", "abc") == first.run_id
    assert tracking.find_run_by_tag(uri, exp_id, "trial_id", "zzz") is None


def test_a_replayed_step_is_logged_once(store):
    """A resumed worker replays the steps after its checkpoint: `logged=last_steps()` drops each metric
    at the steps the run already holds, per key (an eval logged at fewer steps than the loss)."""
    uri, exp_id, client = store
    first = tracking.start_or_resume_run(uri, exp_id, run_name="r")
    assert first.last_steps() == {}
    for step in (1, 2, 3):  # the interrupted attempt: eval logged at step 2 only
        first.log_metrics({"train/loss": 5.0 - step, "eval/top1": 0.2 if step == 2 else None}, step)

    again = tracking.start_or_resume_run(uri, exp_id, run_name="r")
    logged = again.last_steps()
    assert logged == {"train/loss": 3, "eval/top1": 2}
    assert again.history("train/loss") == {1: 4.0, 2: 3.0, 3: 2.0}
    # Resumed from a step-1 checkpoint: steps 2 and 3 come again, then step 4 is new.
    kept = [again.log_metrics({"train/loss": 5.0 - s, "eval/top1": 0.1 * s}, s, logged=logged)
            for s in (2, 3, 4)]
    assert kept == [[], ["eval/top1"], ["train/loss", "eval/top1"]]
    loss = client.get_metric_history(again.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in loss) == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]
    top1 = client.get_metric_history(again.run_id, "eval/top1")
    assert sorted((m.step, m.value) for m in top1) == [(2, 0.2), (3, pytest.approx(0.3)), (4, 0.4)]


def test_parent_child_and_context_manager(store):
    uri, exp_id, client = store
    parent = tracking.start_or_resume_run(uri, exp_id, run_name="sweep")
    child = tracking.start_or_resume_run(uri, exp_id, run_name="child", parent_run_id=parent.run_id)
    with pytest.raises(RuntimeError), child:
        raise RuntimeError("boom")
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.info.status == "FAILED"
    assert pickle.loads(pickle.dumps(child)).run_id == child.run_id  # Ray ships handles by pickle
    with pytest.raises(ValueError):
        parent.finish("DONE")


def test_credentials_omitted_and_long_values_truncated(store):
    uri, exp_id, client = store
    handle = tracking.start_or_resume_run(uri, exp_id, run_name="r")
    omitted = handle.log_params({
        "db.password": "p", "aws.AWS_SECRET_ACCESS_KEY": "s", "hf_token": "t", "OpenAI_API_Key": "k",
        "data.tokenizer": "tok.json", "long": "x" * 10_000, "weird:key=1": 1,
    })
    assert omitted == ["OpenAI_API_Key", "aws.AWS_SECRET_ACCESS_KEY", "db.password", "hf_token"]
    params = client.get_run(handle.run_id).data.params
    assert set(params) == {"data.tokenizer", "long", "weird_key_1"}
    assert params["long"] == "x" * tracking.MAX_PARAM_VALUE_LENGTH


def test_many_params_are_batched(store):
    uri, exp_id, client = store
    handle = tracking.start_or_resume_run(uri, exp_id, run_name="r")
    handle.log_params({f"p{i}": i for i in range(250)})  # > MLflow's 100 params per batch
    assert len(client.get_run(handle.run_id).data.params) == 250


def test_metric_key_validation():
    assert tracking.metric_key("train", "loss") == "train/loss"
    assert tracking.metric_key("eval/zeroshot", "test", "top1") == "eval/zeroshot/test/top1"
    assert tracking.metric_key("eval", "imagenet v2", "top-1.x_y") == "eval/imagenet v2/top-1.x_y"
    for bad in [("train", "loss@1"), ("a:b",), ("", "x"), ("a", "/b"), ("/a",), ("..", "x"), ("a/./b",), ()]:
        with pytest.raises(ValueError):
            tracking.metric_key(*bad)


def test_bad_metric_key_is_refused_before_logging(store):
    uri, exp_id, _ = store
    handle = tracking.start_or_resume_run(uri, exp_id, run_name="r")
    with pytest.raises(ValueError, match="refuses"):
        handle.log_metrics({"train/loss%": 1.0}, step=0)


def test_experiment_created_twice_has_one_id(store, tmp_path):
    uri, exp_id, client = store
    assert tracking.get_or_create_experiment("exp", uri, tmp_path / "elsewhere") == exp_id
    assert len([e for e in client.search_experiments() if e.name == "exp"]) == 1


def test_tracking_uri_resolution_order(tmp_path, monkeypatch):
    default = tracking.default_tracking_uri(tmp_path / "runs")
    assert default == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    assert (tmp_path / "runs").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    assert tracking.resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_tracking_uri(None, tmp_path / "runs") == default
    assert tracking.default_artifact_root("http://127.0.0.1:5000", tmp_path) is None


def test_code_version_names_the_code():
    version = tracking.code_version()
    assert version["scalelab.version"]
    if "scalelab.git_sha" in version:  # source checkout
        assert len(version["scalelab.git_sha"]) == 40
        assert version["scalelab.git_dirty"] in {"true", "false"}


def test_experiments_are_marked_model_training_for_the_mlflow_ui(store, tmp_path):
    uri, exp_id, client = store
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-before-the-kind", artifact_location=(tmp_path / "a").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    assert tracking.get_or_create_experiment("made-before-the-kind", uri) == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(older, "mlflow.experimentKind", "genai_development")  # a user's choice stays
    tracking.get_or_create_experiment("made-before-the-kind", uri)
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "genai_development"


_RACE = """
import sys, time
from pathlib import Path
from scalelab import tracking
folder = Path(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():  # both processes touch the new store at the same moment
    time.sleep(0.001)
print(tracking.get_or_create_experiment("race", sys.argv[1]))
"""


def test_two_commands_creating_one_new_sqlite_store_at_once_both_succeed(tmp_path):
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, uri, str(tmp_path), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):  # both have imported mlflow
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, found by both

