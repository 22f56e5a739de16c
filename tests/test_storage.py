"""storage.py on a local folder and on an S3-protocol server (moto, 127.0.0.1): the same operations
answer the same way; URIs keep their query; checkpoint bookkeeping and the MLflow locations on S3."""

from __future__ import annotations

import json

import pytest

from s3_server import s3_server
from scalelab import storage
from scalelab.config import ConfigError


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, s3):
    """A fresh root on each filesystem: a Path, or an s3:// URI string."""
    if request.param == "local":
        return tmp_path / "root"
    return s3.uri(f"roots/{tmp_path.name}")


def test_join_keeps_a_uri_query_at_the_end_and_a_local_path_a_path(tmp_path):
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "x", "step_1") == "s3://bucket/runs/x/step_1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.name(storage.join(uri, "x", "step_1")) == "step_1"
    assert storage.describe(uri) == "s3://bucket/runs"
    assert storage.artifact_uri(storage.join(uri, "mlartifacts")) == "s3://bucket/runs/mlartifacts"
    assert storage.join(str(tmp_path), "a") == tmp_path / "a"
    assert not storage.is_uri(str(tmp_path)) and storage.is_uri(uri)


def test_files_and_folders_behave_alike_locally_and_on_s3(root, tmp_path):
    assert not storage.exists(root) and storage.list_dir(root) == [] and storage.list_files(root) == set()
    storage.write_text(storage.join(root, "run", "a.json"), '{"x": 1}')
    storage.write_text(storage.join(root, "run", "deep", "b.txt"), "b")
    storage.write_text(storage.join(root, "run", "a.json"), '{"x": 2}')  # replaced whole
    run = storage.join(root, "run")
    assert storage.is_dir(run) and not storage.is_file(run)
    assert storage.is_file(storage.join(run, "a.json")) and not storage.is_dir(storage.join(run, "a.json"))
    assert json.loads(storage.read_text(storage.join(run, "a.json"))) == {"x": 2}
    assert storage.list_dir(run) == ["a.json", "deep"]
    assert storage.list_files(run) == {"a.json", "deep/b.txt"}
    with storage.local_copy(run) as local:
        assert (local / "deep" / "b.txt").read_text() == "b"
    storage.delete(storage.join(run, "a.json"))
    storage.delete(storage.join(run, "a.json"))  # missing: nothing to do
    assert storage.list_files(run) == {"deep/b.txt"}
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(run, "a.json"))


def test_a_uri_with_the_endpoint_in_its_query_reaches_the_same_bucket(s3, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    host = s3.endpoint.removeprefix("http://")
    uri = f"s3://{s3.bucket}/query?endpoint_override={host}&scheme=http"
    storage.write_text(storage.join(uri, "f.txt"), "via query")
    assert storage.read_text(storage.join(uri, "f.txt")) == "via query"
    assert "query/f.txt" in s3.keys("query/")


def test_latest_checkpoint_on_s3_is_the_newest_complete_one(s3):
    from scalelab.train.checkpoint import DS_SUBDIR, META_NAME, latest_checkpoint, read_run_state

    run = s3.uri("ckpt/run")
    assert latest_checkpoint(run) is None

    def checkpoint(step: int, ranks: int) -> None:
        folder = storage.join(run, f"step_{step:08d}")
        storage.write_text(storage.join(folder, META_NAME),
                           json.dumps({"step": step, "world_size": 2, "format": 1}))
        storage.write_text(storage.join(folder, DS_SUBDIR, "latest"), "state")
        for r in range(ranks):
            storage.write_text(storage.join(folder, f"rank_{r}.pt"), "")

    checkpoint(3, 2)
    checkpoint(6, 1)  # a driver killed while Ray was copying: rank 1's share missing
    latest = latest_checkpoint(run)
    assert latest == storage.join(run, "step_00000003")
    assert read_run_state(latest).step == 3
    with pytest.raises(FileNotFoundError, match="not a scalelab checkpoint"):
        read_run_state(storage.join(run, "step_00000009"))


def test_mlflow_on_s3_storage_needs_a_named_store_and_puts_artifacts_in_the_bucket(s3, monkeypatch):
    from scalelab.tracking import default_artifact_root, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="tracking store cannot live there"):
        resolve_tracking_uri(None, s3.uri("runs"))
    assert resolve_tracking_uri("sqlite:////x/mlflow.db", s3.uri("runs")) == "sqlite:////x/mlflow.db"
    assert default_artifact_root("sqlite:////x/mlflow.db", s3.uri("runs") + "?scheme=http") == \
        f"s3://{s3.bucket}/runs/mlartifacts"
    assert default_artifact_root("http://head:5000", s3.uri("runs")) is None  # the server decides
